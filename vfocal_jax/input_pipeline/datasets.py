"""The tf.data datasets: per-host training batches and padded multi-view eval batches.

Flow (train): this host's shard files -> interleaved reads -> shuffle of the
serialized records -> per record, in parallel, `records.train_clip` ->
skip-and-count of bad records -> batch -> colour map per batch -> prefetch.
NumPy comes out (through `iterators.py`); nothing here knows the model or JAX.

Clips come out as uint8 pixels plus a per-clip `pixel_affine` (5, 3) that
holds the colour jitter and the normalisation; the jitted step applies it
(`vfocal_jax.pixels.normalize`). Full-size float work on the host (the colour
map and the clip's mean luma) was half of the pipeline's time beside the
decoding, and uint8 batches are a quarter of the bytes to move.

Every field of `data_cfg` is read directly: `vfocal_jax/configs/data.py`
gives each its default.
"""
from __future__ import annotations

import dataclasses
import math
import os

import ml_collections
import tensorflow as tf

from vfocal_jax import errors
from vfocal_jax.input_pipeline import records, sampling, sources, transforms


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the pipeline knows about a split."""
  num_examples: int | None        # records in the whole split (all hosts); None if unknown
  num_classes: int | None
  label_names: tuple[str, ...] | None


def num_threads(cfg: ml_collections.ConfigDict) -> int:
  return int(cfg.num_threads) or (os.cpu_count() or 1)


def _options(cfg: ml_collections.ConfigDict) -> tf.data.Options:
  """One tf.data thread per core, deterministic order."""
  options = tf.data.Options()
  options.threading.private_threadpool_size = num_threads(cfg)
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
  n = int(cfg.num_classes)
  return n if n > 0 else info_classes


# --- Sources. -----------------------------------------------------------------


@dataclasses.dataclass
class _Split:
  raw: tf.data.Dataset
  info: DatasetInfo
  num_local: int | None              # examples this host will read (None: unknown)
  num_per_host: tuple[int, ...] | None


def _shard_set(cfg, train: bool) -> sources.ShardSet:
  """The split's shards; eval shards written with --label_map may lack labels.txt: train's names then."""
  shard_set = sources.load_shard_set(cfg.train_shards if train else cfg.eval_shards, cfg.label_map)
  if not cfg.label_map and shard_set.label_names is None and not train and cfg.train_shards:
    try:
      train_set = sources.load_shard_set(cfg.train_shards)
    except (FileNotFoundError, ValueError):
      return shard_set
    shard_set = dataclasses.replace(shard_set, label_names=train_set.label_names,
                                    num_classes=shard_set.num_classes or train_set.num_classes)
  return shard_set


def check_sampling_fits(cfg, shard_set: sources.ShardSet) -> None:
  """Refuses dense sampling on shards that keep only some frames per video (SamplingError).

  dataset_info.json says so (`frames_per_video`); shards without it are asked through
  their first record.
  """
  if cfg.sampling != "dense":
    return
  if shard_set.frames_per_video > 0:
    sampling.check_sampling(cfg.sampling, shard_set.frames_per_video,
                            f"{shard_set.frames_per_video_source}: frames_per_video={shard_set.frames_per_video}")
    return
  kept = sources.first_record_kept_frames(shard_set.files[0])
  if kept is not None:
    sampling.check_sampling(cfg.sampling, kept[0], f"the first record of {shard_set.files[0]} keeps {kept[0]} "
                                                   f"of its {kept[1]} frames")


def _open_shards(cfg, *, train: bool, seed: int, process_index: int, process_count: int,
                 repeat: bool, need_counts: bool) -> _Split:
  shard_set = _shard_set(cfg, train)
  check_sampling_fits(cfg, shard_set)
  splits = [sources.split_for_host(shard_set, p, process_count) for p in range(process_count)]
  per_host = None
  if need_counts:
    if shard_set.counts is None:
      shard_set = dataclasses.replace(shard_set, counts=sources.count_records(shard_set.files))
      splits = [sources.split_for_host(shard_set, p, process_count) for p in range(process_count)]
    per_host = tuple(sum(s.counts) for s in splits)
  mine = splits[process_index]
  if not mine.files:
    raise errors.ConfigError(f"process {process_index} got no shard files: the data has fewer shard files than "
                             "there are processes; write it with more (make_shards --num_shards)")
  raw = sources.raw_shard_dataset(mine, shuffle_files=train, repeat=repeat, seed=seed + process_index,
                                  cycle_length=int(cfg.cycle_length), num_threads=num_threads(cfg))
  info = DatasetInfo(shard_set.num_examples, _num_classes(cfg, shard_set.num_classes), shard_set.label_names)
  return _Split(raw, info, None if per_host is None else per_host[process_index], per_host)


def _open_tfds(cfg, *, train: bool, seed: int, process_index: int, process_count: int,
               repeat: bool, need_counts: bool) -> _Split:
  builder = sources.tfds_builder(cfg.tfds_name, cfg.tfds_data_dir)
  split = cfg.tfds_train_split if train else cfg.tfds_eval_split
  host_splits = [sources.tfds_split_for_host(split, p, process_count) for p in range(process_count)]
  label_feature = builder.info.features[cfg.tfds_label_key]
  names = tuple(getattr(label_feature, "names", None) or ()) or None

  def raw_for(p):
    return sources.raw_tfds_dataset(builder, host_splits[p], video_key=cfg.tfds_video_key,
                                    label_key=cfg.tfds_label_key, shuffle_files=train, seed=seed + p)

  per_host = sources.tfds_split_sizes(builder, host_splits)
  if per_host is None and need_counts:  # No split sizes in the metadata: count them.
    per_host = tuple(int(raw_for(p).reduce(0, lambda n, _: n + 1)) for p in range(process_count))
  raw = raw_for(process_index)
  raw = raw.repeat() if repeat else sources.with_final_marker(raw)
  total = sources.tfds_split_sizes(builder, [split])
  classes = getattr(label_feature, "num_classes", None)
  info = DatasetInfo(total[0] if total else None, _num_classes(cfg, classes), names)
  return _Split(raw, info, None if per_host is None else per_host[process_index], per_host)


def _open_split(cfg, **kwargs) -> _Split:
  if cfg.source == "shards":
    return _open_shards(cfg, **kwargs)
  if cfg.source == "tfds":
    return _open_tfds(cfg, **kwargs)
  raise errors.ConfigError(f"data.source={cfg.source!r}: expected 'shards' or 'tfds'")


def get_dataset_info(data_cfg: ml_collections.ConfigDict, split: str = "train") -> DatasetInfo:
  """Split size, number of classes and class names, without building a pipeline.

  `split` is 'train' or 'eval'. Sizes come from dataset_info.json (shards)
  or the tfds metadata; None when unknown.
  """
  train = split == "train"
  if data_cfg.source == "shards":
    s = sources.load_shard_set(data_cfg.train_shards if train else data_cfg.eval_shards, data_cfg.label_map)
    if s.num_classes is None and not train and data_cfg.train_shards:
      t = sources.load_shard_set(data_cfg.train_shards)
      s = dataclasses.replace(s, num_classes=t.num_classes, label_names=t.label_names)
    return DatasetInfo(s.num_examples, _num_classes(data_cfg, s.num_classes), s.label_names)
  if data_cfg.source != "tfds":
    raise errors.ConfigError(f"data.source={data_cfg.source!r}: expected 'shards' or 'tfds'")
  builder = sources.tfds_builder(data_cfg.tfds_name, data_cfg.tfds_data_dir)
  name = data_cfg.tfds_train_split if train else data_cfg.tfds_eval_split
  feature = builder.info.features[data_cfg.tfds_label_key]
  names = tuple(getattr(feature, "names", None) or ()) or None
  total = sources.tfds_split_sizes(builder, [name])
  return DatasetInfo(total[0] if total else None,
                     _num_classes(data_cfg, getattr(feature, "num_classes", None)), names)


# --- The datasets. --------------------------------------------------------------


def _raw_frames_kind(raw: tf.data.Dataset, source: str) -> str:
  if source == "shards":
    return "jpeg"
  return records.frames_kind(raw.element_spec["frames"], source)


def build_train_dataset(data_cfg: ml_collections.ConfigDict, *, batch_size: int, seed: int,
                        num_frames: int, image_size: int, process_index: int = 0,
                        process_count: int = 1, skip_records: int = 0) -> tuple[tf.data.Dataset, DatasetInfo]:
  """The training tf.data.Dataset of this host (infinite, batched, with the records' `file`).

  `skip_records` raw records of this host's stream are dropped before shuffling and
  decoding (cheap: nothing is decoded): a resume that cannot restore the exact
  iterator state starts near the position it had.
  """
  _hide_gpus_from_tf()
  cfg = data_cfg
  split = _open_split(cfg, train=True, seed=seed, process_index=process_index,
                      process_count=process_count, repeat=True, need_counts=False)
  kind = _raw_frames_kind(split.raw, cfg.source)
  ds = split.raw.skip(int(skip_records)) if skip_records > 0 else split.raw
  if int(cfg.shuffle_buffer_size) > 1:
    ds = ds.shuffle(int(cfg.shuffle_buffer_size), seed=seed + 7919 * process_index)
  ds = ds.enumerate()
  base = tf.constant([seed, process_index], tf.int64)
  spec = records.features_spec([num_frames, image_size, image_size, 3], color_draws=[6])

  def process(ex, index):
    example_seed = tf.random.experimental.stateless_fold_in(base, index)
    return records.train_clip(ex, example_seed, cfg, kind=kind, num_frames=num_frames, image_size=image_size)

  ds = records.process_safely(ds, process, spec, source=cfg.source, num_classes=split.info.num_classes,
                              num_threads=num_threads(cfg))
  ds = records.count_and_drop_skipped(ds, spec, bool(cfg.log_skipped))
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.map(lambda b: dict(records.batch_pixel_affine(b, cfg), num_skipped=tf.reduce_max(b["num_skipped"])))
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
  spec = records.features_spec([num_views, num_frames, image_size, image_size, 3], pixel_affine=[5, 3])
  base = tf.constant([seed, process_index], tf.int64)
  affine = transforms.normalization_affine(tuple(cfg.mean), tuple(cfg.std))

  def process(ex, index):
    example_seed = tf.random.experimental.stateless_fold_in(base, index)
    video = records.eval_clip(ex, example_seed, cfg, kind=kind, num_frames=num_frames, image_size=image_size,
                              num_clips=num_clips, num_crops=num_crops)
    return {"video": video, "pixel_affine": affine}

  ds = records.process_safely(split.raw.enumerate(), process, spec, source=cfg.source,
                              num_classes=split.info.num_classes, num_threads=num_threads(cfg))
  ds = records.count_and_drop_skipped(ds, spec, bool(cfg.log_skipped))
  ds = ds.map(lambda e: dict(e, mask=tf.constant(True)))
  padding = tf.data.Dataset.from_tensors(
      dict(records.zeros(spec), num_skipped=tf.constant(-1, tf.int64), mask=tf.constant(False))).repeat()
  ds = ds.concatenate(padding).take(num_batches * batch_size)
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.map(lambda b: dict(b, num_skipped=tf.reduce_max(b["num_skipped"])))
  ds = ds.prefetch(int(cfg.prefetch_batches))
  return ds.with_options(_options(cfg)), split.info, num_batches, split.num_local
