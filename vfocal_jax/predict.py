"""`python main.py predict`: classify video files with a trained or converted model.

    python main.py predict --checkpoint=converted/k400_tiny --video=a.mp4,b.webm \
        [--labels=kinetics_400_labels.csv] [--output_csv=predictions.csv]
    python main.py predict --workdir=workdir/demo --video=videos.csv

Each video is decoded (PyAV) and cut into the evaluation views of the model's
config (`test_num_clips` x `test_num_crops`, the same transform as the eval
pipeline: `input_pipeline.eval_views_from_frames`); the views of several
videos go through one jitted forward, and the softmax of a video's views is
averaged (the eval protocol sums it; the ranking is the same and an average
reads as a probability). A video that cannot be read is reported and
skipped; the others are still predicted.

Where the model comes from:
* `--workdir`: the latest checkpoint of a training run and the run's own
  `config.json` (model, clip length, views, normalisation);
* `--checkpoint`: a converted checkpoint (`params/` + `model.json`); the
  architecture comes from `model.json`, the views, compute dtype and data
  settings from `--config`.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

__all__ = ["LoadedModel", "load_model", "read_video_list", "read_class_names", "video_views",
           "make_predict_fn", "predict_videos", "write_csv", "run"]

TOP_K = 5
MAX_CLIPS_PER_CALL = 12  # Default batch: videos x views per jitted call.


@dataclasses.dataclass
class LoadedModel:
  """A model, its parameters and the config that says how to feed it."""
  model: Any
  params: Any
  config: ml_collections.ConfigDict  # num_frames, image_size, test_num_clips/crops, data, model.
  source: str


def _model_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
  """JSON/ConfigDict model fields as `create_model` arguments (lists -> tuples, dtype names -> dtypes)."""
  from vfocal_jax.train import model_kwargs  # pylint: disable=import-outside-toplevel
  return model_kwargs(ml_collections.ConfigDict({"model": dict(kwargs)}))


def load_model(config: ml_collections.ConfigDict | None, *, workdir: str | None = None,
               checkpoint: str | None = None) -> LoadedModel:
  """The model and parameters of a training workdir or of a converted checkpoint.

  Args:
    config: used with `checkpoint` for views, data fields and compute dtype
      (ignored with `workdir`, whose saved config wins).
    workdir: a training run (latest checkpoint + `workdir/config.json`).
    checkpoint: a converted checkpoint directory (wins over `workdir`).
  """
  from vfocal_jax.models import create_model  # pylint: disable=import-outside-toplevel
  if checkpoint:
    from vfocal_jax import params_io  # pylint: disable=import-outside-toplevel
    params, kwargs = params_io.load_params(checkpoint)
    config = ml_collections.ConfigDict(config.to_dict() if config is not None else {})
    if "model" in config and "dtype" in config.model:
      kwargs["dtype"] = config.model.dtype
    source = checkpoint
  elif workdir:
    from vfocal_jax import checkpoints  # pylint: disable=import-outside-toplevel
    params, saved = checkpoints.load_params_from_workdir(workdir)
    config = ml_collections.ConfigDict(saved.to_dict())
    kwargs = saved.model.to_dict()
    source = workdir
  else:
    raise ValueError("Give --workdir (a training run) or --checkpoint (a converted checkpoint).")
  model = create_model(**_model_kwargs(kwargs))
  config.model = ml_collections.ConfigDict(dict(kwargs))
  config.num_frames = int(model.num_frames)
  if "image_size" not in config:
    config.image_size = 224
  if "data" not in config:
    from vfocal_jax.input_pipeline import data_config_defaults  # pylint: disable=import-outside-toplevel
    config.data = data_config_defaults()
  config.test_num_clips = int(config.get("test_num_clips", 1))
  config.test_num_crops = int(config.get("test_num_crops", 1))
  params = jax.device_put(params)
  logging.info("Loaded %s (%s, %d frames, %d classes).", source, kwargs.get("variant", "?"),
               model.num_frames, model.num_classes)
  return LoadedModel(model=model, params=params, config=config, source=source)


# --- Inputs. ----------------------------------------------------------------------------------

def read_video_list(videos: Sequence[str] | str) -> list[str]:
  """Video paths from `--video`: paths, or one `.csv` / `.txt` file of paths (first column).

  A CSV may have a header and more columns (the official `path,label` layout);
  relative paths are taken relative to the list file when they do not exist
  as given.
  """
  if isinstance(videos, str):
    videos = [v for v in videos.split(",") if v]
  videos = [v.strip() for v in videos if v.strip()]
  if len(videos) == 1 and os.path.splitext(videos[0])[1].lower() in (".csv", ".txt", ".lst"):
    list_file = videos[0]
    root = os.path.dirname(os.path.abspath(list_file))
    paths = []
    with open(list_file, newline="") as f:
      for i, row in enumerate(csv.reader(f)):
        if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
          continue
        path = row[0].strip()
        if " " in path and not os.path.exists(path) and len(row) == 1:  # "path label" lists.
          path = path.split(" ")[0]
        if i == 0 and path.lower() in ("path", "video", "filename", "file", "video_path"):
          continue  # Header.
        if not os.path.isabs(path) and not os.path.exists(path):
          path = os.path.join(root, path)
        paths.append(path)
    return paths
  return list(videos)


def read_class_names(path: str | None, num_classes: int, config: ml_collections.ConfigDict | None = None
                     ) -> list[str]:
  """Class names: `path` (one per line, or the official `id,name` CSV), else the data config's map.

  Falls back to the class indices as strings.
  """
  names: list[str] | None = None
  if path:
    with open(path, newline="") as f:
      rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["id", "name"]:
      table = {int(r[0]): ",".join(r[1:]).strip() for r in rows[1:]}
      names = [table.get(i, str(i)) for i in range(max(table) + 1)] if table else []
    else:
      with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
  elif config is not None and "data" in config:
    try:  # The training run's label map (labels.txt / dataset_info.json beside its shards).
      from vfocal_jax import input_pipeline  # pylint: disable=import-outside-toplevel
      info = input_pipeline.get_dataset_info(config.data, "train")
      names = list(info.label_names) if info.label_names else None
    except Exception:  # Shards moved or no label map: indices.  pylint: disable=broad-except
      names = None
  if names is None:
    return [str(i) for i in range(num_classes)]
  if len(names) != num_classes:
    logging.warning("%d class names for a %d-class model%s; missing ones shown as indices.",
                    len(names), num_classes, f" ({path})" if path else "")
  return [names[i] if i < len(names) else str(i) for i in range(num_classes)]


def video_views(frames: np.ndarray, config: ml_collections.ConfigDict) -> np.ndarray:
  """The eval views `(V, T, H, W, 3)` float32 of decoded frames, as the eval pipeline makes them."""
  from vfocal_jax.input_pipeline import eval_views_from_frames  # pylint: disable=import-outside-toplevel
  return np.asarray(eval_views_from_frames(
      frames, num_frames=int(config.num_frames), image_size=int(config.image_size),
      num_clips=int(config.test_num_clips), num_crops=int(config.test_num_crops), data_cfg=config.data),
      np.float32)


# --- The model. -------------------------------------------------------------------------------

def _probs(params: Any, views: jax.Array, *, model) -> jax.Array:
  """Softmax over classes averaged over each video's views: `(B, V, T, H, W, 3)` -> `(B, C)`."""
  b, v = views.shape[:2]
  logits = model.apply({"params": params}, views.reshape((b * v,) + views.shape[2:]), train=False)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return probs.reshape(b, v, -1).mean(axis=1)


def make_predict_fn(model):
  """`fn(params, views (B, V, T, H, W, 3)) -> probabilities (B, num_classes)`, jitted."""
  return jax.jit(functools.partial(_probs, model=model))


def predict_videos(loaded: LoadedModel, paths: Sequence[str], *, batch_size: int | None = None,
                   class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Top-5 per video; unreadable videos come back with an `error` and no prediction.

  `batch_size` videos (all their views) go through one call; default: as
  many as keep a call at <= 12 clips (one 4 x 3 video).

  Returns:
    One dict per path, in order: `video`, `error` (None when predicted),
    `top` (list of `(class_index, class_name, probability)`), `probs`
    (float32 vector, None on error), `num_views`.
  """
  from vfocal_jax.input_pipeline import decode_video_file  # pylint: disable=import-outside-toplevel
  num_classes = int(loaded.model.num_classes)
  names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
  if not batch_size:
    views_per_video = int(loaded.config.test_num_clips) * int(loaded.config.test_num_crops)
    batch_size = max(1, MAX_CLIPS_PER_CALL // max(views_per_video, 1))
  fn = make_predict_fn(loaded.model)
  results: list[dict[str, Any]] = []
  pending: list[tuple[dict[str, Any], np.ndarray]] = []

  def flush():
    if not pending:
      return
    views = np.stack([v for _, v in pending])
    n = views.shape[0]
    if n < batch_size:  # Pad to a fixed batch: one compilation for every call.
      views = np.concatenate([views, np.zeros((batch_size - n,) + views.shape[1:], views.dtype)])
    probs = np.asarray(fn(loaded.params, views))[:n]
    for (result, _), p in zip(pending, probs):
      top = np.argsort(-p, kind="stable")[:min(TOP_K, num_classes)]
      result["probs"] = p
      result["top"] = [(int(i), names[int(i)], float(p[i])) for i in top]
    pending.clear()

  for path in paths:
    result: dict[str, Any] = {"video": path, "error": None, "top": [], "probs": None, "num_views": 0}
    results.append(result)
    try:
      frames = decode_video_file(path)
      views = video_views(frames, loaded.config)
    except Exception as e:  # Unreadable / undecodable / too short: report, go on.  pylint: disable=broad-except
      result["error"] = f"{type(e).__name__}: {e}"
      logging.warning("Skipping %s: %s", path, result["error"])
      continue
    result["num_views"] = int(views.shape[0])
    pending.append((result, views))
    if len(pending) == batch_size:
      flush()
  flush()
  return results


def format_result(result: dict[str, Any]) -> str:
  """A few lines for the terminal."""
  if result["error"]:
    return f"{result['video']}: NOT PREDICTED ({result['error']})"
  lines = [f"{result['video']}  ({result['num_views']} views)"]
  for rank, (index, name, p) in enumerate(result["top"], 1):
    lines.append(f"  {rank}. {name:<40s} {p:7.4f}   (class {index})")
  return "\n".join(lines)


def write_csv(results: Sequence[dict[str, Any]], path: str) -> str:
  """One row per video: `video,error,class_1,index_1,prob_1,...,class_5,index_5,prob_5`."""
  k = max([len(r["top"]) for r in results] + [1])
  header = ["video", "error"]
  for rank in range(1, k + 1):
    header += [f"class_{rank}", f"index_{rank}", f"prob_{rank}"]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    for r in results:
      row = [r["video"], r["error"] or ""]
      for index, name, p in r["top"]:
        row += [name, index, f"{p:.6f}"]
      row += [""] * (len(header) - len(row))
      writer.writerow(row)
  return path


def run(config: ml_collections.ConfigDict | None, *, workdir: str | None = None, checkpoint: str | None = None,
        videos: Sequence[str] | str | None = None, labels: str | None = None, output_csv: str | None = None,
        batch_size: int | None = None) -> list[dict[str, Any]]:
  """The `predict` command: prints the top-5 of each video and optionally writes a CSV."""
  if not videos:
    raise ValueError("predict needs --video=PATH[,PATH...] (or one .csv of paths).")
  paths = read_video_list(videos)
  if not paths:
    raise ValueError(f"No video paths in --video={videos!r}.")
  loaded = load_model(config, workdir=workdir, checkpoint=checkpoint)
  names = read_class_names(labels, int(loaded.model.num_classes), loaded.config)
  c = loaded.config
  print(f"Model: {loaded.source}  ({c.num_frames} frames x {c.image_size}px, "
        f"{c.test_num_clips} clips x {c.test_num_crops} crops per video)")
  results = predict_videos(loaded, paths, batch_size=batch_size, class_names=names)
  for r in results:
    print(format_result(r))
  failed = [r for r in results if r["error"]]
  print(f"{len(results) - len(failed)} of {len(results)} videos predicted"
        + (f"; {len(failed)} could not be read: " + ", ".join(r["video"] for r in failed) if failed else "."))
  if output_csv:
    write_csv(results, output_csv)
    print(f"Wrote {output_csv}")
  return results
