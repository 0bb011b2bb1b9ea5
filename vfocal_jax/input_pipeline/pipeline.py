"""tf.data pipelines: per-host training batches and padded multi-view eval batches.

Flow (train): this host's shard files -> interleaved reads -> shuffle of the
serialized records -> per record, in parallel: parse, sample frame indices,
decode only those JPEGs (inside the crop window), crop, flip, resize to uint8,
draw the colour jitter -> skip-and-count bad records -> batch -> prefetch.
NumPy comes out; nothing here knows the model or JAX.

Clips come out as uint8 pixels plus a per-clip `pixel_affine` (5, 3) that
holds the colour jitter and the normalisation; the jitted step applies it
(`vfocal_jax.pixels.normalize`). Full-size float work on the host (the colour
map and the clip's mean luma) was half of the pipeline's time beside the
decoding, and uint8 batches are a quarter of the bytes to move.

A bad record (corrupt proto or JPEG, label out of range, no frames) must not
stop training: the parallel map is followed by `ignore_errors()`, records
are numbered before it, and a `scan` after it turns gaps in the numbering
(plus records lost to a truncated file, reported by per-file end markers)
into the cumulative `num_skipped` of the batches and a stderr line naming
the shard (each record carries the shard names of the last 16 records).
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Iterator

import ml_collections
import numpy as np
import tensorflow as tf

from vfocal_jax.input_pipeline import sampling, shard_format, sources, transforms


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the pipeline knows about a split."""
  num_examples: int | None        # records in the whole split (all hosts); None if unknown
  num_classes: int | None
  label_names: tuple[str, ...] | None


# --- Small helpers. -----------------------------------------------------------


def _num_threads(cfg: ml_collections.ConfigDict) -> int:
  return int(cfg.get("num_threads", 0)) or (os.cpu_count() or 1)


def _options(cfg: ml_collections.ConfigDict) -> tf.data.Options:
  """One tf.data thread per core, deterministic order."""
  options = tf.data.Options()
  options.threading.private_threadpool_size = _num_threads(cfg)
  options.threading.max_intra_op_parallelism = 1
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return options


def _hide_gpus_from_tf() -> None:
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # Already initialised; TF then keeps its choice.
    pass


def _num_classes(cfg, info_classes: int | None) -> int | None:
  n = int(cfg.get("num_classes", -1))
  return n if n > 0 else info_classes


def _frames_kind(frames_spec: tf.TensorSpec, source: str) -> str:
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


def _check_label(label: tf.Tensor, num_classes: int | None) -> tf.Tensor:
  upper = num_classes if num_classes else np.iinfo(np.int32).max
  ok = (label >= 0) & (label < upper)
  with tf.control_dependencies([tf.debugging.Assert(ok, ["label out of range:", label])]):
    return tf.identity(label)


# --- Per-record processing. ---------------------------------------------------


def _train_clip(ex: dict, seed: tf.Tensor, cfg, *, kind: str, num_frames: int,
                image_size: int) -> dict[str, tf.Tensor]:
  """Sampled, decoded, cropped, flipped, resized clip (T, S, S, 3) uint8, and its colour draws.

  The colour map itself is built per batch (`_batch_pixel_affine`).
  """
  frames = ex["frames"]
  n = tf.shape(frames)[0]
  idx = sampling.train_indices(n, num_frames, sampling=cfg.sampling, interval=int(cfg.frame_interval),
                               seed=tf.random.experimental.stateless_fold_in(seed, 1))
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


def _batch_pixel_affine(batch: dict, cfg) -> dict:
  """Replaces the batch's colour draws by its (B, 5, 3) pixel_affine (jitter + normalisation)."""
  batch = dict(batch)
  a, k = transforms.color_matrices(
      batch.pop("color_draws"), jitter_prob=float(cfg.color_jitter_prob), brightness=float(cfg.brightness),
      contrast=float(cfg.contrast), saturation=float(cfg.saturation), hue=float(cfg.hue),
      grayscale_prob=float(cfg.grayscale_prob))
  batch["pixel_affine"] = transforms.pixel_affine(a, k, tuple(cfg.mean), tuple(cfg.std))
  return batch


def _eval_clip(ex: dict, seed: tf.Tensor, cfg, *, kind: str, num_frames: int, image_size: int,
               num_clips: int, num_crops: int) -> tf.Tensor:
  """All test views of one video, (V, T, S, S, 3) uint8 (normalised by the `pixel_affine` of the batch)."""
  frames = ex["frames"]
  n = tf.shape(frames)[0]
  idx = sampling.eval_indices(n, num_frames, sampling=cfg.sampling, interval=int(cfg.frame_interval),
                              num_clips=num_clips, clip_offsets=cfg.eval_clip_offsets, seed=seed)
  picked = _gather_frames(frames, tf.reshape(idx, [-1]), kind, num_clips * num_frames)
  views = transforms.eval_views(picked, num_clips=num_clips, num_frames=num_frames,
                                image_size=image_size, num_crops=num_crops,
                                resize_ratio=float(cfg.eval_resize_ratio))
  return tf.ensure_shape(views, [num_clips * num_crops, num_frames, image_size, image_size, 3])


def _parse(raw: dict, source: str) -> dict:
  if source == "shards":
    return shard_format.parse_sequence_example(raw["record"])
  return {"frames": raw["frames"], "label": raw["label"]}


_WINDOW = 16   # files of the last records each element remembers, to name skipped ones


def _features_spec(video_shape: list[int], **extra: list[int]) -> dict[str, tf.TensorSpec]:
  """What `process` returns for one record (and what end markers and padding hold): uint8
  video, int32 label and the float32 `extra` fields of the given shapes."""
  return dict({"video": tf.TensorSpec(video_shape, tf.uint8), "label": tf.TensorSpec([], tf.int32)},
              **{k: tf.TensorSpec(shape, tf.float32) for k, shape in extra.items()})


def _zeros(spec: dict[str, tf.TensorSpec]) -> dict[str, tf.Tensor]:
  return {k: tf.zeros(s.shape, s.dtype) for k, s in spec.items()}


def _process_safely(ds: tf.data.Dataset, process, spec: dict[str, tf.TensorSpec], *, source: str,
                    num_threads: int) -> tf.data.Dataset:
  """Runs `process` (-> dict matching `spec`) on every (index, raw) element in parallel; failures disappear.

  Each element first records the shard files of the last `_WINDOW` raw
  elements (a cheap scan), then the heavy `process` runs in a parallel map
  followed by `ignore_errors()`. A record that raises (corrupt proto or JPEG,
  label out of range, no frames) leaves a gap in the indices that
  `_count_and_drop_skipped` counts and names. End-of-file markers become
  placeholders carrying the records lost to a truncated file.
  """

  def remember(files, elem):
    index, raw = elem
    files = tf.concat([files[1:], [raw["file"]]], axis=0)
    return files, (index, raw, files)

  ds = ds.scan(tf.fill([_WINDOW], ""), remember)

  def run(index, raw, files):
    def good():
      return process(_parse(raw, source), index)

    def end_marker():
      return _zeros(spec)

    features = tf.cond(raw["is_end"], end_marker, good)
    return dict(features, index=index, files=files, missing=raw["missing"], is_end=raw["is_end"])

  ds = ds.map(run, num_parallel_calls=num_threads, deterministic=True)
  return ds.ignore_errors()


def _count_and_drop_skipped(ds: tf.data.Dataset, spec: dict[str, tf.TensorSpec], log: bool) -> tf.data.Dataset:
  """Cumulative skip count on every good element; end markers are dropped."""

  def step(state, elem):
    last_index, total = state
    failed = elem["index"] - last_index - 1          # records that raised since the last survivor
    skipped = failed + elem["missing"]
    total = total + skipped
    if log:
      def report():
        known = tf.cast(tf.minimum(failed, _WINDOW - 1), tf.int32)
        names = elem["files"][_WINDOW - 1 - known:_WINDOW - 1]
        tf.print("vfocal_jax input pipeline: skipped", failed,
                 "unreadable record(s) (corrupt data or JPEG, bad label, no frames) from shard(s)",
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


# --- Sources. -----------------------------------------------------------------


@dataclasses.dataclass
class _Split:
  raw: tf.data.Dataset
  info: DatasetInfo
  num_local: int | None              # examples this host will read (None: unknown)
  num_per_host: tuple[int, ...] | None


def _open_split(cfg, *, train: bool, seed: int, process_index: int, process_count: int,
                repeat: bool, need_counts: bool) -> _Split:
  threads = _num_threads(cfg)
  if cfg.source == "shards":
    spec = cfg.train_shards if train else cfg.eval_shards
    shard_set = sources.load_shard_set(spec, cfg.get("label_map", ""))
    if not cfg.get("label_map", "") and shard_set.label_names is None and not train and cfg.train_shards:
      # Eval shards written with --label_map may lack labels.txt: use train's.
      try:
        train_set = sources.load_shard_set(cfg.train_shards)
        shard_set = dataclasses.replace(shard_set, label_names=train_set.label_names,
                                        num_classes=shard_set.num_classes or train_set.num_classes)
      except (FileNotFoundError, ValueError):
        pass
    splits = [sources.split_for_host(shard_set, p, process_count) for p in range(process_count)]
    per_host = None
    if need_counts:
      if shard_set.counts is None:
        counted = sources.count_records(shard_set.files)
        shard_set = dataclasses.replace(shard_set, counts=counted)
        splits = [sources.split_for_host(shard_set, p, process_count) for p in range(process_count)]
      per_host = tuple(sum(s.counts) for s in splits)
    mine = splits[process_index]
    if not mine.files:
      raise ValueError(f"Host {process_index} got no shard files.")
    raw = sources.raw_shard_dataset(mine, shuffle_files=train, repeat=repeat, seed=seed + process_index,
                                    cycle_length=int(cfg.cycle_length), num_threads=threads)
    info = DatasetInfo(shard_set.num_examples, _num_classes(cfg, shard_set.num_classes),
                       shard_set.label_names)
    return _Split(raw, info, None if per_host is None else per_host[process_index], per_host)
  if cfg.source == "tfds":
    builder = sources.tfds_builder(cfg.tfds_name, cfg.get("tfds_data_dir", ""))
    split = cfg.tfds_train_split if train else cfg.tfds_eval_split
    host_splits = [sources.tfds_split_for_host(split, p, process_count) for p in range(process_count)]
    label_feature = builder.info.features[cfg.tfds_label_key]
    names = tuple(getattr(label_feature, "names", None) or ()) or None

    def raw_for(p):
      return sources.raw_tfds_dataset(builder, host_splits[p], video_key=cfg.tfds_video_key,
                                      label_key=cfg.tfds_label_key, shuffle_files=train,
                                      seed=seed + p)

    per_host = sources.tfds_split_sizes(builder, host_splits)
    if per_host is None and need_counts:  # No split sizes in the metadata: count them.
      per_host = tuple(int(raw_for(p).reduce(0, lambda n, _: n + 1)) for p in range(process_count))
    raw = raw_for(process_index)
    raw = raw.repeat() if repeat else sources.with_final_marker(raw)
    total = sources.tfds_split_sizes(builder, [split])
    classes = getattr(label_feature, "num_classes", None)
    info = DatasetInfo(total[0] if total else None, _num_classes(cfg, classes), names)
    return _Split(raw, info, None if per_host is None else per_host[process_index], per_host)
  raise ValueError(f"Unknown data source {cfg.source!r}; expected 'shards' or 'tfds'.")


def get_dataset_info(data_cfg: ml_collections.ConfigDict, split: str = "train") -> DatasetInfo:
  """Split size, number of classes and class names, without building a pipeline.

  `split` is 'train' or 'eval'. Sizes come from dataset_info.json (shards)
  or the tfds metadata; None when unknown.
  """
  train = split == "train"
  if data_cfg.source == "shards":
    spec = data_cfg.train_shards if train else data_cfg.eval_shards
    s = sources.load_shard_set(spec, data_cfg.get("label_map", ""))
    if s.num_classes is None and not train and data_cfg.train_shards:
      t = sources.load_shard_set(data_cfg.train_shards)
      s = dataclasses.replace(s, num_classes=t.num_classes, label_names=t.label_names)
    return DatasetInfo(s.num_examples, _num_classes(data_cfg, s.num_classes), s.label_names)
  builder = sources.tfds_builder(data_cfg.tfds_name, data_cfg.get("tfds_data_dir", ""))
  name = data_cfg.tfds_train_split if train else data_cfg.tfds_eval_split
  feature = builder.info.features[data_cfg.tfds_label_key]
  names = tuple(getattr(feature, "names", None) or ()) or None
  total = sources.tfds_split_sizes(builder, [name])
  return DatasetInfo(total[0] if total else None,
                     _num_classes(data_cfg, getattr(feature, "num_classes", None)), names)


# --- Public factories. --------------------------------------------------------


def _raw_frames_kind(raw: tf.data.Dataset, source: str) -> str:
  if source == "shards":
    return "jpeg"
  return _frames_kind(raw.element_spec["frames"], source)


def build_train_dataset(data_cfg: ml_collections.ConfigDict, *, batch_size: int, seed: int,
                        num_frames: int, image_size: int, process_index: int = 0,
                        process_count: int = 1) -> tuple[tf.data.Dataset, DatasetInfo]:
  """The training tf.data.Dataset of this host (infinite, batched)."""
  _hide_gpus_from_tf()
  cfg = data_cfg
  split = _open_split(cfg, train=True, seed=seed, process_index=process_index,
                      process_count=process_count, repeat=True, need_counts=False)
  kind = _raw_frames_kind(split.raw, cfg.source)
  ds = split.raw
  if int(cfg.shuffle_buffer_size) > 1:
    ds = ds.shuffle(int(cfg.shuffle_buffer_size), seed=seed + 7919 * process_index)
  ds = ds.enumerate()
  base = tf.constant([seed, process_index], tf.int64)
  num_classes = split.info.num_classes
  spec = _features_spec([num_frames, image_size, image_size, 3], color_draws=[6])

  def process(ex, index):
    example_seed = tf.random.experimental.stateless_fold_in(base, index)
    label = _check_label(ex["label"], num_classes)
    clip = _train_clip(ex, example_seed, cfg, kind=kind, num_frames=num_frames, image_size=image_size)
    return dict(clip, label=label)

  threads = _num_threads(cfg)
  ds = _process_safely(ds, process, spec, source=cfg.source, num_threads=threads)
  ds = _count_and_drop_skipped(ds, spec, bool(cfg.log_skipped))
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.map(lambda b: dict(_batch_pixel_affine(b, cfg), num_skipped=tf.reduce_max(b["num_skipped"])))
  ds = ds.prefetch(int(cfg.prefetch_batches))
  return ds.with_options(_options(cfg)), split.info


def build_eval_dataset(data_cfg: ml_collections.ConfigDict, *, batch_size: int, num_frames: int,
                       image_size: int, num_clips: int, num_crops: int, process_index: int = 0,
                       process_count: int = 1, seed: int = 0):
  """The eval tf.data.Dataset of this host, padded to the same batch count on all hosts.

  Returns (dataset, info, num_batches, num_local_examples).
  """
  _hide_gpus_from_tf()
  cfg = data_cfg
  split = _open_split(cfg, train=False, seed=seed, process_index=process_index,
                      process_count=process_count, repeat=False, need_counts=True)
  kind = _raw_frames_kind(split.raw, cfg.source)
  num_batches = max(1, max(math.ceil(n / batch_size) for n in split.num_per_host))
  num_views = num_clips * num_crops
  spec = _features_spec([num_views, num_frames, image_size, image_size, 3], pixel_affine=[5, 3])
  base = tf.constant([seed, process_index], tf.int64)
  num_classes = split.info.num_classes
  affine = transforms.normalization_affine(tuple(cfg.mean), tuple(cfg.std))

  def process(ex, index):
    label = _check_label(ex["label"], num_classes)
    example_seed = tf.random.experimental.stateless_fold_in(base, index)
    video = _eval_clip(ex, example_seed, cfg, kind=kind, num_frames=num_frames, image_size=image_size,
                       num_clips=num_clips, num_crops=num_crops)
    return {"video": video, "pixel_affine": affine, "label": label}

  threads = _num_threads(cfg)
  ds = _process_safely(split.raw.enumerate(), process, spec, source=cfg.source, num_threads=threads)
  ds = _count_and_drop_skipped(ds, spec, bool(cfg.log_skipped))
  ds = ds.map(lambda e: dict(e, mask=tf.constant(True)))
  padding = tf.data.Dataset.from_tensors(
      dict(_zeros(spec), num_skipped=tf.constant(-1, tf.int64), mask=tf.constant(False))).repeat()
  ds = ds.concatenate(padding).take(num_batches * batch_size)
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.map(lambda b: dict(b, num_skipped=tf.reduce_max(b["num_skipped"])))
  ds = ds.prefetch(int(cfg.prefetch_batches))
  return ds.with_options(_options(cfg)), split.info, num_batches, split.num_local


class TrainIterator:
  """Infinite iterator of training batches (dicts of NumPy) with a checkpointable state.

  `save(path)` / `restore(path)` write / read the tf.data iterator state
  (clu.data.TfDatasetIterator): a restored iterator yields exactly the
  batches the saved one would have yielded next. The state includes the
  shuffle buffer (`shuffle_buffer_size` serialized records).
  """

  def __init__(self, dataset: tf.data.Dataset, info: DatasetInfo, checkpoint: bool):
    from clu.data import dataset_iterator
    self._it = dataset_iterator.TfDatasetIterator(dataset, checkpoint=checkpoint)
    self.info = info
    self.num_examples = info.num_examples
    self.num_classes = info.num_classes
    self.label_names = info.label_names

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  @property
  def element_spec(self):
    return self._it.element_spec

  def save(self, filename: str | os.PathLike) -> None:
    self._it.save(filename)

  def restore(self, filename: str | os.PathLike) -> None:
    self._it.restore(filename)


class EvalIterator:
  """A finite pass over the eval split; iterate it again for another pass.

  Every host yields `num_batches` batches of `video` uint8 (B, V, T, S, S, 3),
  `pixel_affine` float32 (B, 5, 3) (the normalisation), `label` (B,), `mask`
  (B,) (False on padding) and `num_skipped`; the real
  examples of all hosts together are the split, each exactly once.
  """

  def __init__(self, dataset: tf.data.Dataset, info: DatasetInfo, num_batches: int, num_local: int):
    self._dataset = dataset
    self._current = None
    self.info = info
    self.num_examples = info.num_examples       # whole split, all hosts
    self.num_local_examples = num_local         # records this host reads
    self.num_batches = num_batches
    self.num_classes = info.num_classes
    self.label_names = info.label_names

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    skipped = 0
    for batch in self._dataset.as_numpy_iterator():
      skipped = max(skipped, int(batch["num_skipped"]))   # padding-only batches carry -1
      batch["num_skipped"] = np.asarray(skipped, np.int64)
      yield batch

  def __next__(self) -> dict[str, np.ndarray]:
    if self._current is None:
      self._current = iter(self)
    return next(self._current)


def create_train_iterator(data_cfg: ml_collections.ConfigDict, *, batch_size: int, seed: int,
                          num_frames: int, image_size: int, process_index: int = 0,
                          process_count: int = 1) -> TrainIterator:
  """Infinite per-host training iterator.

  Args:
    data_cfg: `config.data` (every field: `vfocal_jax/configs/data.py`).
    batch_size: examples per batch on this host.
    seed: same seed, same hosts -> same batches.
    num_frames, image_size: clip shape (T, S, S).
    process_index, process_count: this host and the number of hosts.

  Yields:
    dicts of NumPy: `video` uint8 (B, T, S, S, 3) pixels, `pixel_affine`
    float32 (B, 5, 3) with each clip's colour jitter and normalisation
    (`vfocal_jax.pixels.normalize(video, pixel_affine)` is the model input),
    `label` int32 (B,), `num_skipped` int64 (cumulative bad records on this
    host).
  """
  ds, info = build_train_dataset(data_cfg, batch_size=batch_size, seed=seed, num_frames=num_frames,
                                 image_size=image_size, process_index=process_index,
                                 process_count=process_count)
  return TrainIterator(ds, info, bool(data_cfg.get("checkpoint_iterator", True)))


def create_eval_iterator(data_cfg: ml_collections.ConfigDict, *, batch_size: int, num_frames: int,
                         image_size: int, num_clips: int | None = None, num_crops: int | None = None,
                         process_index: int = 0, process_count: int = 1, seed: int = 0) -> EvalIterator:
  """Finite per-host eval iterator with views, padded to the same batch count on every host.

  num_clips / num_crops default to data_cfg.eval_num_clips / eval_num_crops.
  `seed` only matters with eval_clip_offsets='random'.
  """
  num_clips = int(num_clips or data_cfg.get("eval_num_clips", 1))
  num_crops = int(num_crops or data_cfg.get("eval_num_crops", 1))
  ds, info, num_batches, num_local = build_eval_dataset(
      data_cfg, batch_size=batch_size, num_frames=num_frames, image_size=image_size,
      num_clips=num_clips, num_crops=num_crops, process_index=process_index,
      process_count=process_count, seed=seed)
  return EvalIterator(ds, info, num_batches, num_local)


def eval_views_from_frames(frames: np.ndarray, *, num_frames: int, image_size: int, num_clips: int,
                           num_crops: int, data_cfg: ml_collections.ConfigDict,
                           seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The eval pipeline's views of a decoded video, as the eval batches hold them.

  Args:
    frames: uint8 (N, H, W, 3), e.g. from `decode_video_file`.
    data_cfg: the sampling / resize / normalisation fields.

  Returns:
    `(views, pixel_affine)`: uint8 (V, T, S, S, 3) and float32 (5, 3), the
    normalisation (`vfocal_jax.pixels.normalize` applies it on the device).
  """
  cfg = data_cfg
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
