"""One record -> one clip (or the eval views), and the skip-and-count of bad records.

Per record, inside the parallel tf.data map: parse, sample frame indices
(on the video's timeline when the record keeps only some frames: `sampling.py`),
decode only those JPEGs (inside the crop window), crop, flip, resize to uint8,
draw the colour jitter (train) or make all test views (eval).

A corrupt record (proto or JPEG, no frames, a file cut short) must not stop
training: the parallel map is followed by `ignore_errors()`, records are
numbered before it, and a `scan` after it turns gaps in the numbering (plus
records lost to a truncated file, reported by per-file end markers) into the
cumulative `num_skipped` of the batches and a stderr line naming the shard
(each record carries the shard names of the last `WINDOW` records).

A label outside [0, num_classes) is not such a record: it means the data and
the classifier disagree on the number of classes. It is not skipped; the
record keeps its label and its shard (`file`), and the iterators raise
`LabelOutOfRangeError` naming both (`iterators.py`).
"""
from __future__ import annotations

import sys

import numpy as np
import tensorflow as tf

from vfocal_jax.input_pipeline import sampling, shard_format, transforms

WINDOW = 16   # files of the last records each element remembers, to name skipped ones


# --- Frames. --------------------------------------------------------------------


def frames_kind(frames_spec: tf.TensorSpec, source: str) -> str:
  """'jpeg' (shards), 'encoded' (tfds strings of any image format) or 'decoded' (uint8 arrays)."""
  if frames_spec.dtype == tf.string:
    return "jpeg" if source == "shards" else "encoded"
  return "decoded"


def _decode(encoded: tf.Tensor, kind: str, crop_window: tf.Tensor | None = None) -> tf.Tensor:
  if kind == "jpeg":
    if crop_window is not None:
      return tf.image.decode_and_crop_jpeg(encoded, crop_window, channels=3)
    return tf.io.decode_jpeg(encoded, channels=3)
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  if crop_window is not None:
    y, x, h, w = tf.unstack(crop_window)
    image = image[y:y + h, x:x + w]
  return image


def _gather_frames(frames: tf.Tensor, idx: tf.Tensor, kind: str, count: int,
                   crop_window: tf.Tensor | None = None) -> tf.Tensor:
  """Decodes just the frames at `idx` (static length `count`), (count, h, w, 3) uint8."""
  picked = tf.gather(frames, idx)
  if kind == "decoded":
    if crop_window is not None:
      y, x, h, w = tf.unstack(crop_window)
      picked = picked[:, y:y + h, x:x + w]
    return tf.cast(picked, tf.uint8)
  return tf.stack([_decode(picked[i], kind, crop_window) for i in range(count)])


def _frame_shape(frames: tf.Tensor, kind: str) -> tf.Tensor:
  if kind == "jpeg":
    return tf.image.extract_jpeg_shape(frames[0])[:2]
  if kind == "encoded":
    return tf.shape(tf.io.decode_image(frames[0], channels=3, expand_animations=False))[:2]
  return tf.shape(frames)[1:3]


def label_in_range(label: tf.Tensor, num_classes: int | None) -> tf.Tensor:
  """Whether 0 <= label < num_classes (no upper bound when the number of classes is unknown)."""
  upper = num_classes if num_classes else np.iinfo(np.int32).max
  return (label >= 0) & (label < upper)


# --- Per-record processing. -------------------------------------------------------


def train_clip(ex: dict, seed: tf.Tensor, cfg, *, kind: str, num_frames: int,
               image_size: int) -> dict[str, tf.Tensor]:
  """Sampled, decoded, cropped, flipped, resized clip (T, S, S, 3) uint8, and its colour draws.

  The colour map itself is built per batch (`batch_pixel_affine`).
  """
  frames = ex["frames"]
  n = tf.shape(frames)[0]
  idx = sampling.train_positions(n, num_frames, sampling=cfg.sampling, interval=int(cfg.frame_interval),
                                 seed=tf.random.experimental.stateless_fold_in(seed, 1),
                                 frame_index=ex.get("frame_index"), num_video_frames=ex.get("num_video_frames"))
  height, width = tf.unstack(_frame_shape(frames, kind))
  # The crop is drawn on the frame resized to short side R, then mapped back
  # to the stored frame so that only the crop window is decoded and resized.
  short = int(cfg.train_resize_ratio * image_size)
  rh, rw = transforms.short_side_size(height, width, short)
  box = transforms.random_resized_crop_box(
      rh, rw, area_range=tuple(cfg.rrc_area_range), aspect_ratio_range=tuple(cfg.rrc_aspect_ratio_range),
      seed=tf.random.experimental.stateless_fold_in(seed, 2))
  sy = tf.cast(height, tf.float64) / tf.cast(rh, tf.float64)
  sx = tf.cast(width, tf.float64) / tf.cast(rw, tf.float64)
  y0 = tf.minimum(tf.cast(tf.floor(tf.cast(box[0], tf.float64) * sy), tf.int32), height - 1)
  x0 = tf.minimum(tf.cast(tf.floor(tf.cast(box[1], tf.float64) * sx), tf.int32), width - 1)
  h0 = tf.clip_by_value(tf.cast(tf.round(tf.cast(box[2], tf.float64) * sy), tf.int32), 1, height - y0)
  w0 = tf.clip_by_value(tf.cast(tf.round(tf.cast(box[3], tf.float64) * sx), tf.int32), 1, width - x0)
  window = tf.stack([y0, x0, h0, w0])
  video = _gather_frames(frames, idx, kind, num_frames, window)     # uint8 crops
  fold = lambda k: tf.random.experimental.stateless_fold_in(seed, k)  # noqa: E731
  video = transforms.flip(video, float(cfg.flip_prob), fold(3))      # cheaper before the resize
  video = transforms.resize_uint8(video, (image_size, image_size))
  return {"video": tf.ensure_shape(video, [num_frames, image_size, image_size, 3]),
          "color_draws": transforms.color_draws(fold(4))}


def batch_pixel_affine(batch: dict, cfg) -> dict:
  """Replaces the batch's colour draws by its (B, 5, 3) pixel_affine (jitter + normalisation)."""
  batch = dict(batch)
  a, k = transforms.color_matrices(
      batch.pop("color_draws"), jitter_prob=float(cfg.color_jitter_prob), brightness=float(cfg.brightness),
      contrast=float(cfg.contrast), saturation=float(cfg.saturation), hue=float(cfg.hue),
      grayscale_prob=float(cfg.grayscale_prob))
  batch["pixel_affine"] = transforms.pixel_affine(a, k, tuple(cfg.mean), tuple(cfg.std))
  return batch


def eval_clip(ex: dict, seed: tf.Tensor, cfg, *, kind: str, num_frames: int, image_size: int,
              num_clips: int, num_crops: int) -> tf.Tensor:
  """All test views of one video, (V, T, S, S, 3) uint8 (normalised by the `pixel_affine` of the batch)."""
  frames = ex["frames"]
  n = tf.shape(frames)[0]
  idx = sampling.eval_positions(n, num_frames, sampling=cfg.sampling, interval=int(cfg.frame_interval),
                                num_clips=num_clips, clip_offsets=cfg.eval_clip_offsets, seed=seed,
                                frame_index=ex.get("frame_index"), num_video_frames=ex.get("num_video_frames"))
  picked = _gather_frames(frames, tf.reshape(idx, [-1]), kind, num_clips * num_frames)
  views = transforms.eval_views(picked, num_clips=num_clips, num_frames=num_frames,
                                image_size=image_size, num_crops=num_crops,
                                resize_ratio=float(cfg.eval_resize_ratio))
  return tf.ensure_shape(views, [num_clips * num_crops, num_frames, image_size, image_size, 3])


def eval_views_of_frames(frames: np.ndarray, *, num_frames: int, image_size: int, num_clips: int,
                         num_crops: int, cfg, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """`eval_clip` on decoded frames in NumPy (see `iterators.eval_views_from_frames`)."""
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[0] == 0 or frames.shape[-1] != 3:
    raise ValueError(f"Expected frames (N>0, H, W, 3), got {frames.shape}.")
  # Sample first, then hand TF only the frames used (a long video can be GBs).
  idx = sampling.eval_indices(tf.constant(frames.shape[0]), num_frames, sampling=cfg.sampling,
                              interval=int(cfg.frame_interval), num_clips=num_clips,
                              clip_offsets=cfg.eval_clip_offsets, seed=tf.constant([seed, 0], tf.int64))
  picked = tf.convert_to_tensor(frames[idx.numpy().reshape(-1)].astype(np.uint8))
  views = transforms.eval_views(picked, num_clips=num_clips, num_frames=num_frames, image_size=image_size,
                                num_crops=num_crops, resize_ratio=float(cfg.eval_resize_ratio))
  affine = transforms.normalization_affine(tuple(cfg.mean), tuple(cfg.std))
  return views.numpy(), affine.numpy()


def parse(raw: dict, source: str) -> dict:
  if source == "shards":
    return shard_format.parse_sequence_example(raw["record"])
  return {"frames": raw["frames"], "label": raw["label"]}


# --- Skip and count. ----------------------------------------------------------------


def features_spec(video_shape: list[int], **extra: list[int]) -> dict[str, tf.TensorSpec]:
  """What `process` returns for one record (and what end markers and padding hold): uint8
  video, int32 label, the record's shard (`file`) and the float32 `extra` fields of the given shapes."""
  return dict({"video": tf.TensorSpec(video_shape, tf.uint8), "label": tf.TensorSpec([], tf.int32),
               "file": tf.TensorSpec([], tf.string)},
              **{k: tf.TensorSpec(shape, tf.float32) for k, shape in extra.items()})


def zeros(spec: dict[str, tf.TensorSpec]) -> dict[str, tf.Tensor]:
  return {k: tf.zeros(s.shape, s.dtype) for k, s in spec.items()}


def process_safely(ds: tf.data.Dataset, process, spec: dict[str, tf.TensorSpec], *, source: str,
                   num_classes: int | None, num_threads: int) -> tf.data.Dataset:
  """Runs `process(ex, index)` on every (index, raw) element in parallel; failures disappear.

  `process` returns the fields of `spec` but `label` and `file`, which are
  added here.

  Each element first records the shard files of the last `WINDOW` raw
  elements (a cheap scan), then the heavy `process` runs in a parallel map
  followed by `ignore_errors()`. A record that raises (corrupt proto or JPEG,
  no frames) leaves a gap in the indices that `count_and_drop_skipped`
  counts and names. A record whose label is out of range is not processed:
  it comes out with zero pixels, its label and its `file`, for the iterator
  to refuse. End-of-file markers become placeholders carrying the records
  lost to a truncated file.
  """

  def remember(files, elem):
    index, raw = elem
    files = tf.concat([files[1:], [raw["file"]]], axis=0)
    return files, (index, raw, files)

  ds = ds.scan(tf.fill([WINDOW], ""), remember)

  body = {k: s for k, s in spec.items() if k not in ("label", "file")}   # what `process` returns

  def run(index, raw, files):
    def record():
      ex = parse(raw, source)
      label = tf.cast(ex["label"], tf.int32)
      features = tf.cond(label_in_range(label, num_classes), lambda: process(ex, index),
                         lambda: zeros(body))
      return dict(features, label=label, file=raw["file"])

    features = tf.cond(raw["is_end"], lambda: zeros(spec), record)
    return dict(features, index=index, files=files, missing=raw["missing"], is_end=raw["is_end"])

  ds = ds.map(run, num_parallel_calls=num_threads, deterministic=True)
  return ds.ignore_errors()


def count_and_drop_skipped(ds: tf.data.Dataset, spec: dict[str, tf.TensorSpec], log: bool) -> tf.data.Dataset:
  """Cumulative skip count on every good element; end markers are dropped."""

  def step(state, elem):
    last_index, total = state
    failed = elem["index"] - last_index - 1          # records that raised since the last survivor
    skipped = failed + elem["missing"]
    total = total + skipped
    if log:
      def report():
        known = tf.cast(tf.minimum(failed, WINDOW - 1), tf.int32)
        names = elem["files"][WINDOW - 1 - known:WINDOW - 1]
        tf.print("vfocal_jax input pipeline: skipped", failed,
                 "unreadable record(s) (corrupt data or JPEG, no frames) from shard(s)",
                 tf.strings.reduce_join(names, separator=", "), "-", total, "so far on this host",
                 output_stream=sys.stderr)
        return tf.constant(0)

      def report_missing():
        tf.print("vfocal_jax input pipeline:", elem["missing"], "record(s) of shard", elem["files"][-1],
                 "could not be read (truncated or corrupt file) -", total, "so far on this host",
                 output_stream=sys.stderr)
        return tf.constant(0)
      tf.cond(elem["missing"] > 0, report_missing, lambda: tf.constant(0))
      tf.cond(failed > 0, report, lambda: tf.constant(0))
    return (elem["index"], total), dict(elem, num_skipped=total)

  ds = ds.scan((tf.constant(-1, tf.int64), tf.constant(0, tf.int64)), step)
  ds = ds.filter(lambda e: tf.logical_not(e["is_end"]))
  return ds.map(lambda e: dict({k: tf.ensure_shape(e[k], s.shape) for k, s in spec.items()},
                                num_skipped=e["num_skipped"]))
