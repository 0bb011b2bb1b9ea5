"""PNG figures of a run: training curves and the confusion matrix.

TensorBoard already has the curves while a run goes; these are the static
pictures to keep next to `eval_results.json` (and to read on a machine
without TensorBoard).

    from vfocal_jax import plots
    plots.plot_training_curves(workdir, workdir + "/training_curves.png")
    cm = plots.confusion_matrix(labels, predictions, num_classes)
    plots.plot_confusion_matrix(cm, workdir + "/confusion_matrix.png", class_names)

The scalars are read from the TensorBoard event files that
`clu.metric_writers` writes into the workdir, with tensorboard's protobufs
(no TensorFlow import). Matplotlib runs on its Agg backend: no display needed.
"""
from __future__ import annotations

import io
import struct
from collections.abc import Mapping, Sequence
from typing import Union

import numpy as np

from vfocal_jax import errors, paths

__all__ = ["read_scalars", "plot_training_curves", "confusion_matrix", "plot_confusion_matrix"]

Scalars = Mapping[str, tuple[Sequence[int], Sequence[float]]]

# Panels of the curves figure: (title, tags, y-label). Tags absent from a run are skipped.
CURVE_PANELS = (
    ("loss", ("loss",), "cross-entropy (mixup targets)"),
    ("train top-1 (batch)", ("top1",), "fraction"),
    ("eval accuracy", ("eval/top1", "eval/top5"), "%"),
    ("learning rate", ("learning_rate",), "lr"),
    ("gradient norm", ("grad_norm",), "global norm (before clipping)"),
    ("throughput", ("clips_per_sec",), "clips/s"),
)


def pyplot():
  """matplotlib.pyplot on the Agg backend (no display needed)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _records(path: str):
  """The payloads of a TFRecord file (the container of TensorBoard event files)."""
  with paths.resolve(path).open("rb") as f:
    while True:
      header = f.read(12)  # uint64 length + uint32 masked CRC of the length.
      if len(header) < 12:
        return
      (length,) = struct.unpack("<Q", header[:8])
      data = f.read(length)
      if len(data) < length or len(f.read(4)) < 4:  # Truncated last record (run still writing).
        return
      yield data


def read_scalars(logdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Every scalar summary in the event files of `logdir` (not recursive).

  Returns:
    `{tag: (steps, values)}`, sorted by step; a step written twice (a resumed
    run) keeps its last value.
  """
  from tensorboard.compat.proto import event_pb2  # pylint: disable=import-outside-toplevel
  from tensorboard.util import tensor_util  # pylint: disable=import-outside-toplevel

  points: dict[str, dict[int, float]] = {}
  for path in sorted(str(p) for p in paths.resolve(logdir).glob("events.out.tfevents.*")):
    for record in _records(path):
      event = event_pb2.Event.FromString(record)
      if not event.HasField("summary"):
        continue
      for value in event.summary.value:
        kind = value.WhichOneof("value")
        if kind == "simple_value":
          number = float(value.simple_value)
        elif kind == "tensor":
          array = tensor_util.make_ndarray(value.tensor)
          if array.size != 1 or array.dtype.kind not in "fiub":
            continue  # Text, hparams, histograms: not scalars.
          number = float(array.reshape(()))
        else:
          continue
        points.setdefault(value.tag, {})[int(event.step)] = number
  out = {}
  for tag, by_step in points.items():
    steps = np.array(sorted(by_step), np.int64)
    out[tag] = (steps, np.array([by_step[s] for s in steps], np.float64))
  return out


def plot_training_curves(scalars: Union[str, Scalars], path: str, *, title: str | None = None) -> str:
  """Writes a PNG grid of the training curves; returns `path`.

  Args:
    scalars: a workdir (its event files are read) or `{tag: (steps, values)}`.
    path: the PNG to write (its directory is created).
    title: figure title (default: the workdir's name).
  """
  if isinstance(scalars, str):
    title = title or paths.resolve(scalars).name
    scalars = read_scalars(scalars)
  panels = [(name, [t for t in tags if t in scalars], ylabel) for name, tags, ylabel in CURVE_PANELS]
  panels = [p for p in panels if p[1]]
  if not panels:
    raise errors.UserError(f"no training scalars to plot (tags present: {sorted(scalars)})")
  plt = pyplot()
  cols = min(3, len(panels))
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
  for ax, (name, tags, ylabel) in zip(axes.flat, panels):
    for tag in tags:
      steps, values = scalars[tag]
      style = "o-" if len(steps) < 30 else "-"
      ax.plot(steps, values, style, markersize=3, linewidth=1.2, label=tag)
    if name == "learning rate" or (name == "loss" and _spans_decades(scalars, tags)):
      ax.set_yscale("log")
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(tags) > 1:
      ax.legend(fontsize=8)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return save_figure(fig, path)


def _spans_decades(scalars: Scalars, tags: Sequence[str]) -> bool:
  values = np.concatenate([np.asarray(scalars[t][1], np.float64) for t in tags])
  values = values[np.isfinite(values) & (values > 0)]
  return values.size > 1 and values.max() / values.min() > 30


def confusion_matrix(labels: Sequence[int], predictions: Sequence[int], num_classes: int) -> np.ndarray:
  """Counts `(num_classes, num_classes)`: row = true class, column = predicted class."""
  labels = np.asarray(labels, np.int64).ravel()
  predictions = np.asarray(predictions, np.int64).ravel()
  if labels.shape != predictions.shape:
    raise ValueError(f"{labels.shape[0]} labels but {predictions.shape[0]} predictions")
  out = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(out, (labels, predictions), 1)
  return out


def plot_confusion_matrix(confusion: np.ndarray, path: str, class_names: Sequence[str] | None = None, *,
                          normalize: bool = True, title: str | None = None) -> str:
  """Writes the confusion matrix as a PNG (rows: true class, normalised per row); returns `path`.

  Class names label the axes up to 60 classes; beyond that the matrix is drawn
  without tick labels (a 400-class matrix is a picture of its diagonal).
  """
  confusion = np.asarray(confusion, np.float64)
  n = confusion.shape[0]
  if confusion.shape != (n, n):
    raise ValueError(f"confusion must be square, got {confusion.shape}")
  counts = confusion.sum(axis=1, keepdims=True)
  shown = confusion / np.maximum(counts, 1) if normalize else confusion
  plt = pyplot()
  size = float(np.clip(0.28 * n + 2.5, 4.5, 16))
  fig, ax = plt.subplots(figsize=(size + 1.2, size))
  image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None, interpolation="nearest")
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class" if normalize else "videos")
  if n <= 60:
    names = list(class_names) if class_names is not None and len(class_names) == n else [str(i) for i in range(n)]
    ax.set_xticks(range(n), names, rotation=90, fontsize=7 if n > 20 else 9)
    ax.set_yticks(range(n), names, fontsize=7 if n > 20 else 9)
    if n <= 20:
      for i in range(n):
        for j in range(n):
          if confusion[i, j]:
            ax.text(j, i, f"{int(confusion[i, j])}", ha="center", va="center", fontsize=8,
                    color="white" if shown[i, j] > 0.5 * (shown.max() or 1) else "black")
  accuracy = np.trace(confusion) / max(confusion.sum(), 1)
  ax.set_xlabel("predicted class")
  ax.set_ylabel("true class")
  ax.set_title(title or f"confusion matrix ({int(confusion.sum())} videos, top-1 {100 * accuracy:.1f}%)")
  fig.tight_layout()
  return save_figure(fig, path)


def save_figure(fig, path: str, dpi: int = 110) -> str:
  """Writes ``fig`` as a PNG to ``path`` (local or gs://), closes it; returns the path written."""
  out = io.BytesIO()
  fig.savefig(out, dpi=dpi, format="png")
  pyplot().close(fig)
  target = paths.resolve(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_bytes(out.getvalue())
  return str(target)
