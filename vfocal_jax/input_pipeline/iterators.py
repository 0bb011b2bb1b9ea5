"""The iterators the training and eval loops use: NumPy batches, a checkpointable train state.

Both refuse a record whose label is outside [0, num_classes) with a
`LabelOutOfRangeError` naming the shard and the label: such a record means
the classifier has the wrong number of classes for the data (or the labels
are wrong), which skipping would hide.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import ml_collections
import numpy as np
import tensorflow as tf

from vfocal_jax.input_pipeline import records
from vfocal_jax.input_pipeline.datasets import DatasetInfo, build_eval_dataset, build_train_dataset


class LabelOutOfRangeError(ValueError):
  """A record's label is outside [0, num_classes): the data and the classifier disagree."""


def check_labels(files: np.ndarray, labels: np.ndarray, num_classes: int | None) -> None:
  """Raises LabelOutOfRangeError for the first label outside [0, num_classes)."""
  labels = np.asarray(labels)
  upper = num_classes if num_classes else np.iinfo(np.int32).max
  bad = np.flatnonzero((labels < 0) | (labels >= upper))
  if not bad.size:
    return
  i = int(bad[0])
  name = files[i].decode("utf-8", "replace") if isinstance(files[i], bytes) else str(files[i])
  classes = f"[0, {num_classes})" if num_classes else "[0, ...)"
  raise LabelOutOfRangeError(
      f"{name}: a record has label {int(labels[i])}, outside {classes}. The data has more classes than the "
      f"model is given: set data.num_classes and model.num_classes to the number of classes of the data "
      f"(data.num_classes=-1 takes it from dataset_info.json / labels.txt beside the shards, or from the "
      f"tfds metadata), or fix the labels of that shard. Such records are not skipped: they mean a "
      f"classifier head of the wrong size.")


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
    batch = next(self._it)
    check_labels(batch.pop("file"), batch["label"], self.num_classes)
    return batch

  @property
  def element_spec(self):
    return {k: v for k, v in self._it.element_spec.items() if k != "file"}

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
      mask = batch["mask"]
      check_labels(batch.pop("file")[mask], batch["label"][mask], self.num_classes)
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

  Raises (when iterated):
    LabelOutOfRangeError: a record's label is outside [0, num_classes).
  """
  ds, info = build_train_dataset(data_cfg, batch_size=batch_size, seed=seed, num_frames=num_frames,
                                 image_size=image_size, process_index=process_index,
                                 process_count=process_count)
  return TrainIterator(ds, info, bool(data_cfg.checkpoint_iterator))


def create_eval_iterator(data_cfg: ml_collections.ConfigDict, *, batch_size: int, num_frames: int,
                         image_size: int, num_clips: int | None = None, num_crops: int | None = None,
                         process_index: int = 0, process_count: int = 1, seed: int = 0) -> EvalIterator:
  """Finite per-host eval iterator with views, padded to the same batch count on every host.

  num_clips / num_crops default to data_cfg.eval_num_clips / eval_num_crops.
  `seed` only matters with eval_clip_offsets='random'.
  """
  num_clips = int(num_clips or data_cfg.eval_num_clips)
  num_crops = int(num_crops or data_cfg.eval_num_crops)
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
  return records.eval_views_of_frames(frames, num_frames=num_frames, image_size=image_size,
                                      num_clips=num_clips, num_crops=num_crops, cfg=data_cfg, seed=seed)
