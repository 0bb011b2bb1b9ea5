"""`python main.py predict`: classify video files with a trained or converted model.

    python main.py predict --checkpoint=converted/k400_tiny --video=a.mp4,gs://bucket/b.webm \
        [--labels=kinetics_400_labels.csv] [--output_csv=predictions.csv]
    python main.py predict --workdir=workdir/demo --video=videos.csv
    python main.py predict --exported=exported/k400_tiny --video=a.mp4

The model, its clip, its evaluation views (clips x crops, short side,
normalisation) and its class names come from the artifact's model card
(`resolve.artifact`): no other flag is needed. Each video is decoded (PyAV) and
cut into those views as the eval pipeline cuts them; the views of several
videos go through one jitted forward (`batch.view_probabilities`: the
softmax averaged over each video's views). A video that cannot be read is
reported and skipped, the others are still predicted, and the command then
exits with status 1. With `--exported=OUT` (written by `export`) the same
views go through the exported program instead (`vfocal_jax.export.load`).
"""
from __future__ import annotations

import csv
import functools
import io
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from vfocal_jax import artifacts, errors, paths
from vfocal_jax import batch as batch_lib

__all__ = ["read_video_list", "read_videos", "read_class_names", "video_views", "make_predict_fn", "predict_videos",
           "predict_exported_videos", "classify_videos", "write_csv", "run", "top_classes",
           "PredictionFailed"]

TOP_K = 5
EXIT_STATUS_FAILED = 1  # `main.py predict` / `visualize` when any video could not be read.
MAX_CLIPS_PER_CALL = 12  # Default batch: videos x views per jitted call.


class PredictionFailed(errors.UserError, RuntimeError):
  """Some videos could not be predicted (the others were, and were printed): exit status 1."""

  exit_status = EXIT_STATUS_FAILED


# --- Inputs. ----------------------------------------------------------------------------------

def read_video_list(videos: Sequence[str] | str) -> list[str]:
  """Video paths from `--video`: paths, or one `.csv` / `.txt` / `.lst` list file of paths.

  A list file is read and checked by `user_lists.read_video_list` (header, more
  columns, relative paths, `gs://`; a damaged list is a one-line `BadFileError`).
  """
  if isinstance(videos, str):
    videos = [v for v in videos.split(",") if v]
  videos = [v.strip() for v in videos if v.strip()]
  if len(videos) == 1 and videos[0].lower().endswith((".csv", ".txt", ".lst")):
    from vfocal_jax.input_pipeline import user_lists  # pylint: disable=import-outside-toplevel
    return user_lists.read_video_list(videos[0])
  return list(videos)


def read_videos(videos: Sequence[str] | str | None) -> list[str]:
  """``--video``'s paths (`read_video_list`), or a FlagError when it names none."""
  if not videos:
    raise errors.FlagError("predict needs --video=PATH[,PATH...] (or one .csv of paths)")
  video_paths = read_video_list(videos)
  if not video_paths:
    raise errors.FlagError(f"--video={videos}: no video paths")
  return video_paths


def read_class_names(path: str | None, num_classes: int, card_names: Sequence[str] | None = None) -> list[str]:
  """Class names: `path` (checked by `user_lists.read_class_names`), else the card's, else indices."""
  names: list[str | None] | None = list(card_names) if card_names else None
  if path:
    from vfocal_jax.input_pipeline import user_lists  # pylint: disable=import-outside-toplevel
    names = user_lists.read_class_names(path)
    if len(names) != num_classes:
      logging.warning("%d class names in %s for a %d-class model; missing ones shown as indices.",
                      len(names), path, num_classes)
  if names is None:
    return [str(i) for i in range(num_classes)]
  return [names[i] if i < len(names) and names[i] is not None else str(i) for i in range(num_classes)]


def video_views(frames: np.ndarray, config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
  """The eval views `(V, T, S, S, 3)` uint8 of decoded frames and their `pixel_affine` (5, 3)."""
  from vfocal_jax.input_pipeline import eval_views_from_frames  # pylint: disable=import-outside-toplevel
  return eval_views_from_frames(frames, num_frames=int(config.num_frames), image_size=int(config.image_size),
                                num_clips=int(config.test_num_clips), num_crops=int(config.test_num_crops),
                                data_cfg=config.data)


def sample_span(config: ml_collections.ConfigDict) -> int:
  """Frames a clip of ``config`` samples from: fewer and frames repeat."""
  if config.data.sampling == "dense":
    return (int(config.num_frames) - 1) * int(config.data.frame_interval) + 1
  return int(config.num_frames)


# --- The model. -------------------------------------------------------------------------------

def top_classes(probs: np.ndarray, names: Sequence[str]) -> list[tuple[int, str, float]]:
  """The `TOP_K` most probable classes: `(index, name, probability)`, best first (ties by index)."""
  order = np.argsort(-probs, kind="stable")[:min(TOP_K, len(probs))]
  return [(int(i), names[int(i)], float(probs[i])) for i in order]


def make_predict_fn(model):
  """`fn(params, views (B, V, T, H, W, 3), pixel_affine (B, 5, 3)) -> probabilities (B, C)`, jitted."""
  return jax.jit(functools.partial(batch_lib.view_probabilities, model))


def predict_videos(loaded: artifacts.Loaded, videos: Sequence[str], *, batch_size: int | None = None,
                   class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Top-5 per video; unreadable videos come back with an `error` and no prediction.

  `batch_size` videos (all their views) go through one call; default: as
  many as keep a call at <= 12 clips (one 4 x 3 video).

  Returns:
    One dict per path, in order: `video`, `error` (None when predicted),
    `top` (list of `(class_index, class_name, probability)`), `probs`
    (float32 vector, None on error), `num_views`.
  """
  fn = make_predict_fn(loaded.model)
  params = jax.device_put(loaded.params)
  return classify_videos(lambda views, affine: fn(params, views, affine), loaded.config, videos,
                         num_classes=int(loaded.model.num_classes), batch_size=batch_size, class_names=class_names)


def predict_exported_videos(exported: Any, config: ml_collections.ConfigDict, videos: Sequence[str], *,
                            batch_size: int | None = None,
                            class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """`predict_videos` through an exported model (`vfocal_jax.export.load`): the same decoding and views.

  The export normalises inside with the card's mean/std, so the views' `pixel_affine` is not used.
  """
  return classify_videos(lambda views, affine: exported.views(views), config, videos,
                         num_classes=int(exported.num_classes), batch_size=batch_size, class_names=class_names)


def classify_videos(probabilities_fn: Callable[[np.ndarray, np.ndarray], Any], config: ml_collections.ConfigDict,
                    videos: Sequence[str], *, num_classes: int, batch_size: int | None = None,
                    class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Decodes each video, cuts the eval views of `config`, and ranks `probabilities_fn(views, affine)`.

  `probabilities_fn` maps uint8 views (B, V, T, H, W, 3) and their `pixel_affine` (B, 5, 3) to
  probabilities (B, C); B is always `batch_size` (short batches are padded: one compilation).
  """
  from vfocal_jax.input_pipeline import decode_video_file  # pylint: disable=import-outside-toplevel
  names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
  if not batch_size:
    batch_size = max(1, MAX_CLIPS_PER_CALL // (int(config.test_num_clips) * int(config.test_num_crops)))
  results: list[dict[str, Any]] = []
  pending: list[tuple[dict[str, Any], np.ndarray, np.ndarray]] = []

  def flush():
    if not pending:
      return
    views = np.stack([v for _, v, _ in pending])
    affine = np.stack([a for _, _, a in pending])
    n = views.shape[0]
    if n < batch_size:  # Pad to a fixed batch: one compilation for every call.
      views = np.concatenate([views, np.zeros((batch_size - n,) + views.shape[1:], views.dtype)])
      affine = np.concatenate([affine, np.repeat(affine[:1], batch_size - n, axis=0)])
    probs = np.asarray(probabilities_fn(views, affine))[:n]
    for (result, _, _), p in zip(pending, probs):
      result["probs"] = p
      result["top"] = top_classes(p, names)
    pending.clear()

  span = sample_span(config)
  for path in videos:
    result: dict[str, Any] = {"video": path, "error": None, "top": [], "probs": None, "num_views": 0}
    results.append(result)
    try:
      frames = decode_video_file(path)
      views, affine = video_views(frames, config)
    except (ValueError, OSError) as e:  # Unreadable / not a video / undecodable: report, go on.
      result["error"] = f"{type(e).__name__}: {e}"
      logging.warning("Skipping %s: %s", path, result["error"])
      continue
    if len(frames) < span:
      logging.warning("%s has %d frames, fewer than the %d a clip samples: frames are repeated.",
                      path, len(frames), span)
    result["num_views"] = int(views.shape[0])
    pending.append((result, views, affine))
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
  """One row per video: `video,error,class_1,index_1,prob_1,...,class_5,index_5,prob_5` (local or gs://)."""
  k = max([len(r["top"]) for r in results] + [1])
  header = ["video", "error"]
  for rank in range(1, k + 1):
    header += [f"class_{rank}", f"index_{rank}", f"prob_{rank}"]
  out = io.StringIO()
  writer = csv.writer(out)
  writer.writerow(header)
  for r in results:
    row = [r["video"], r["error"] or ""]
    for index, name, p in r["top"]:
      row += [name, index, f"{p:.6f}"]
    row += [""] * (len(header) - len(row))
    writer.writerow(row)
  return paths.write_text(path, out.getvalue())


def run(loaded: artifacts.Loaded, *, videos: Sequence[str] | str | None = None, labels: str | None = None,
        output_csv: str | None = None, batch_size: int | None = None) -> list[dict[str, Any]]:
  """The `predict` command: prints the top-5 of each video, optionally writes a CSV.

  `loaded`: a Flax artifact (`resolve.artifact`) or an export (`resolve.exported`, whose
  `params` are None: the weights are inside the exported model).

  Raises:
    PredictionFailed: after printing (and writing) the others, when any video failed.
  """
  video_paths = read_videos(videos)
  c = loaded.config
  if loaded.params is None:
    names = read_class_names(labels, loaded.model.num_classes, loaded.model.class_names)
    classify = functools.partial(predict_exported_videos, loaded.model, c)
  else:
    names = read_class_names(labels, int(loaded.model.num_classes), loaded.card.class_names)
    classify = functools.partial(predict_videos, loaded)
  print(f"Model: {loaded.source}  ({c.num_frames} frames x {c.image_size}px, "
        f"{c.test_num_clips} clips x {c.test_num_crops} crops per video)")
  results = classify(video_paths, batch_size=batch_size, class_names=names)
  for r in results:
    print(format_result(r))
  failed = [r for r in results if r["error"]]
  print(f"{len(results) - len(failed)} of {len(results)} videos predicted"
        + (f"; {len(failed)} could not be read: " + ", ".join(r["video"] for r in failed) if failed else "."))
  if output_csv:
    print(f"Wrote {write_csv(results, output_csv)}")
  if failed:
    raise PredictionFailed(f"{len(failed)} of {len(results)} videos could not be predicted.")
  return results
