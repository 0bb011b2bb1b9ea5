"""`python main.py visualize`: where do the spatial and temporal modulators look?

    python main.py visualize --checkpoint=converted/k400_tiny --video=a.mp4 --output_dir=figures/
    python main.py visualize --workdir=workdir/demo --video=a.mp4,b.mp4 --output_dir=figures/

For each video, two PNGs in the style of the paper's figure ("first and last
layer spatio-temporal modulator"):

* `<video>_modulators.png`: the frames of one clip (the centre view, as the
  model saw it after resizing and cropping) in the top row; below, the
  magnitude of the spatial and of the temporal modulator of the first layer
  (stage 1, block 1) and of the last layer (last stage, last block),
  upsampled (bilinear) onto the frames and drawn over them as a heat map;
* `<video>_top5.png`: the top-5 classes over all the evaluation views, as a
  bar chart of probabilities.

Magnitude = L2 norm over channels of the modulator, the quantity FocalNets
visualise: the model's `spatial_modulator` / `temporal_modulator`
intermediates (`mutable=['intermediates']`), one map per frame. Each row of
the figure shares one colour scale (min..max over its frames), so a row shows
how the modulator moves across time, not just where it peaks in each frame.
"""
from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vfocal_jax import artifacts, config_fields, errors, paths, pixels, plots, predict

__all__ = ["modulator_magnitudes", "select_layers", "upsample", "plot_modulators",
           "plot_top5", "visualize_video", "run"]

KINDS = ("spatial_modulator", "temporal_modulator")


def _magnitudes(params: Any, clip: jax.Array, pixel_affine: jax.Array, *,
                model) -> tuple[jax.Array, dict[str, jax.Array]]:
  x = pixels.normalize(clip, pixel_affine)
  logits, state = model.apply({"params": params}, x, train=False, mutable=["intermediates"])
  flat = traverse_util.flatten_dict(state["intermediates"], sep="/")
  out = {}
  for path, value in flat.items():
    kind = path.split("/")[-1]
    if kind in KINDS:
      sown = value[0] if isinstance(value, (tuple, list)) else value
      out[path] = jnp.linalg.norm(sown.astype(jnp.float32), axis=-1)  # (B*T', h, w)
  return logits.astype(jnp.float32), out


@functools.lru_cache(maxsize=8)
def _jitted(model):
  return jax.jit(functools.partial(_magnitudes, model=model))


def modulator_magnitudes(model, params: Any, clip: np.ndarray,
                         pixel_affine: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Logits and the channel L2 norm of every sown modulator for one clip.

  Args:
    clip: `(T, H, W, 3)` pixels of one view (uint8, as the eval pipeline cuts it).
    pixel_affine: `(5, 3)` its normalisation (`pixels.normalize`).

  Returns:
    `(logits (num_classes,), {path: (T', h, w)})`, path like
    `layers_0/blocks_0/modulation/spatial_modulator`.
  """
  logits, maps = _jitted(model)(params, jnp.asarray(clip)[None], jnp.asarray(pixel_affine, jnp.float32)[None])
  return np.asarray(logits[0]), {k: np.asarray(v) for k, v in maps.items()}


def _stage_block(path: str) -> tuple[int, int]:
  stage = re.search(r"layers_(\d+)", path)
  block = re.search(r"blocks_(\d+)", path)
  return (int(stage.group(1)) if stage else 0, int(block.group(1)) if block else 0)


def select_layers(maps: dict[str, np.ndarray]) -> list[tuple[str, str, np.ndarray]]:
  """The first and last layer's spatial and temporal maps: `[(row title, path, (T', h, w)), ...]`."""
  by_kind: dict[str, list[str]] = {k: sorted((p for p in maps if p.endswith(k)), key=_stage_block) for k in KINDS}
  if not any(by_kind.values()):
    raise RuntimeError("The model sowed no spatial_modulator / temporal_modulator intermediates.")
  rows = []
  for position, pick in (("first", 0), ("last", -1)):
    for kind in KINDS:
      found = by_kind[kind]
      if not found:
        continue  # e.g. design='spatial_only' has no temporal modulator.
      path = found[pick]
      stage, block = _stage_block(path)
      rows.append((f"{kind.split('_')[0]} modulator\n{position} layer (stage {stage + 1}, block {block + 1})",
                   path, maps[path]))
  return rows


def upsample(maps: np.ndarray, height: int, width: int) -> np.ndarray:
  """`(N, h, w)` -> `(N, height, width)`, bilinear (half-pixel centres, as an image resize)."""
  maps = jnp.asarray(maps, jnp.float32)
  return np.asarray(jax.image.resize(maps, (maps.shape[0], height, width), method="bilinear"))


def plot_modulators(frames: np.ndarray, rows: Sequence[tuple[str, str, np.ndarray]], path: str, *,
                    title: str = "", tubelet: int = 1, alpha: float = 0.55) -> str:
  """The frames and the modulator heat maps over them, one column per frame; returns `path`."""
  plt = plots.pyplot()
  t, h, w, _ = frames.shape
  n_rows = 1 + len(rows)
  cell = 1.6 if t > 6 else 2.0
  fig, axes = plt.subplots(n_rows, t, figsize=(cell * t + 1.6, cell * n_rows * h / w + 0.6), squeeze=False)
  for j in range(t):
    axes[0, j].imshow(frames[j])
    axes[0, j].set_title(f"frame {j + 1}", fontsize=8)
  axes[0, 0].set_ylabel("frames", fontsize=9)
  for i, (label, _, maps) in enumerate(rows, start=1):
    big = upsample(maps, h, w)
    finite = big[np.isfinite(big)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    scale = (big - lo) / (hi - lo) if hi > lo else np.zeros_like(big)
    for j in range(t):
      ax = axes[i, j]
      ax.imshow(frames[j])
      ax.imshow(scale[min(j // tubelet, len(scale) - 1)], cmap="jet", alpha=alpha, vmin=0, vmax=1,
                interpolation="nearest")
    axes[i, 0].set_ylabel(label, fontsize=8)
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return plots.save_figure(fig, path, dpi=100)


def plot_top5(top: Sequence[tuple[int, str, float]], path: str, *, title: str = "") -> str:
  """Horizontal bars of the top-5 probabilities (best at the top); returns `path`."""
  plt = plots.pyplot()
  names = [name for _, name, _ in top][::-1]
  probs = [p for _, _, p in top][::-1]
  fig, ax = plt.subplots(figsize=(6.0, 0.45 * len(top) + 1.2))
  bars = ax.barh(range(len(top)), probs, color=["#9ecae1"] * (len(top) - 1) + ["#3182bd"])
  ax.set_yticks(range(len(top)), names)
  ax.set_xlim(0, 1)
  ax.set_xlabel("probability (softmax averaged over the views)")
  for bar, p in zip(bars, probs):
    ax.text(min(p + 0.01, 0.88), bar.get_y() + bar.get_height() / 2, f"{p:.3f}", va="center", fontsize=9)
  if title:
    ax.set_title(title, fontsize=10)
  fig.tight_layout()
  return plots.save_figure(fig, path, dpi=100)


def visualize_video(loaded: artifacts.Loaded, frames: np.ndarray, output_dir: str, name: str, *,
                    class_names: Sequence[str] | None = None) -> dict[str, Any]:
  """Writes the two PNGs of one decoded video; returns their paths, the maps and the top-5."""
  config = loaded.config
  one_view = config_fields.updated(config, {"test_num_clips": 1, "test_num_crops": 1})
  clip, affine = predict.video_views(frames, one_view)
  _, maps = modulator_magnitudes(loaded.model, loaded.params, clip[0], affine)
  rows = select_layers(maps)
  views, affine = predict.video_views(frames, config)
  probs = np.asarray(predict.make_predict_fn(loaded.model)(loaded.params, views[None], affine[None]))[0]
  top = predict.top_classes(probs, list(class_names) if class_names else [str(i) for i in range(len(probs))])
  stem = paths.join(output_dir, name)
  modulators_png = plot_modulators(
      clip[0], rows, stem + "_modulators.png", title=f"{name}: predicted '{top[0][1]}' ({top[0][2]:.2f})",
      tubelet=int(loaded.model.tubelet_size))
  top5_png = plot_top5(top, stem + "_top5.png", title=f"{name}: top-5 over {views.shape[0]} views")
  return {"modulators_png": modulators_png, "top5_png": top5_png, "top": top,
          "maps": {path: m for _, path, m in rows}}


def _name_for(path: str, used: set[str]) -> str:
  name = os.path.splitext(os.path.basename(path))[0] or "video"
  base, i = name, 1
  while name in used:
    i += 1
    name = f"{base}_{i}"
  used.add(name)
  return name


def run(loaded: artifacts.Loaded, *, videos: Sequence[str] | str | None = None, output_dir: str | None = None,
        labels: str | None = None) -> list[dict[str, Any]]:
  """The `visualize` command: PNGs per video in `output_dir`; unreadable videos are reported.

  Raises:
    predict.PredictionFailed: after the others, when any video could not be read.
  """
  from vfocal_jax.input_pipeline import decode_video_file  # pylint: disable=import-outside-toplevel
  if not videos:
    raise errors.FlagError("visualize needs --video=PATH[,PATH...]")
  if not output_dir:
    raise errors.FlagError("visualize needs --output_dir=DIR for the PNG figures")
  video_paths = predict.read_video_list(videos)
  names = predict.read_class_names(labels, int(loaded.model.num_classes), loaded.card.class_names)
  results, used = [], set()
  for path in video_paths:
    try:
      frames = decode_video_file(path)
    except (ValueError, OSError) as e:  # Unreadable or not a video: report, go on with the others.
      print(f"{path}: NOT VISUALISED ({type(e).__name__}: {e})")
      results.append({"video": path, "error": f"{type(e).__name__}: {e}"})
      continue
    out = visualize_video(loaded, frames, output_dir, _name_for(path, used), class_names=names)
    print(f"{path}: top-1 '{out['top'][0][1]}' ({out['top'][0][2]:.3f})\n  {out['modulators_png']}\n  {out['top5_png']}")
    results.append({"video": path, "error": None, **out})
  failed = [r for r in results if r["error"]]
  if failed:
    raise predict.PredictionFailed(f"{len(failed)} of {len(results)} videos could not be read.")
  return results
