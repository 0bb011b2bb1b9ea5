"""The iterators the training and eval loops use: NumPy batches, a checkpointable train state.

Both refuse a record whose label is outside [0, num_classes) with a
`LabelOutOfRangeError` naming the shard and the label: such a record means
the classifier has the wrong number of classes for the data (or the labels
are wrong), which skipping would hide.

The train iterator counts the examples it has yielded on all hosts together
(`position()`), so a checkpoint restored by another number of processes can
still put the input near where it was (`restore_position`, rule in
`records_to_skip`).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections
import numpy as np
import tensorflow as tf

from vfocal_jax import errors
from vfocal_jax.input_pipeline import records
from vfocal_jax.input_pipeline.datasets import DatasetInfo, build_eval_dataset, build_train_dataset


class LabelOutOfRangeError(errors.UserError, ValueError):
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


def records_to_skip(examples_consumed: int, epoch_size: int | None, process_index: int,
                    process_count: int) -> tuple[int, int]:
  """Raw records host ``process_index`` of ``process_count`` skips to resume near a saved position.

  The examples consumed in the current epoch (``examples_consumed % epoch_size``;
  all of them when the epoch size is unknown) are shared out over the hosts,
  the first hosts taking one more when they do not divide: the hosts together
  skip exactly that many records of their (re-split) files. Returns
  ``(records this host skips, examples consumed in the current epoch)``.
  """
  in_epoch = examples_consumed % epoch_size if epoch_size else examples_consumed
  share, rest = divmod(in_epoch, process_count)
  return share + (1 if process_index < rest else 0), in_epoch


class TrainIterator:
  """Infinite iterator of training batches (dicts of NumPy) with a checkpointable state.

  `save(path)` / `restore(path)` write / read the tf.data iterator state
  (clu.data.TfDatasetIterator): a restored iterator yields exactly the
  batches the saved one would have yielded next. The state includes the
  shuffle buffer (`shuffle_buffer_size` serialized records). It belongs to
  one host of one process count; `position()` / `restore_position()` carry
  the global count of examples consumed to any process count instead.
  """

  def __init__(self, dataset: tf.data.Dataset, info: DatasetInfo, checkpoint: bool, *,
               global_batch: int | None = None, process_index: int = 0, process_count: int = 1,
               rebuild: Callable[[int], tf.data.Dataset] | None = None):
    self._checkpoint = checkpoint
    self._it = self._wrap(dataset)
    self.info = info
    self.num_examples = info.num_examples
    self.num_classes = info.num_classes
    self.label_names = info.label_names
    self.global_batch = global_batch            # examples one batch of every host together holds
    self.process_index, self.process_count = process_index, process_count
    self._rebuild = rebuild                     # skip_records -> this host's dataset
    self.examples_consumed: int | None = 0      # on all hosts; None: unknown (an older checkpoint)
    self._skipped = 0                           # records all hosts skipped at the start of their streams

  def _wrap(self, dataset: tf.data.Dataset):
    from clu.data import dataset_iterator
    return dataset_iterator.TfDatasetIterator(dataset, checkpoint=self._checkpoint)

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    check_labels(batch.pop("file"), batch["label"], self.num_classes)
    if self.examples_consumed is not None and self.global_batch:
      self.examples_consumed += self.global_batch
    return batch

  @property
  def element_spec(self):
    return {k: v for k, v in self._it.element_spec.items() if k != "file"}

  def save(self, filename: str | os.PathLike) -> None:
    """Writes this host's exact tf.data state (nothing when `data.checkpoint_iterator` is False)."""
    self._it.save(filename)

  def restore(self, filename: str | os.PathLike) -> None:
    self._it.restore(filename)

  def _skip(self, skipped: int, *, restart: bool) -> None:
    """This host's stream after its share of ``skipped`` records (all hosts together); `restart`: even if unchanged."""
    if skipped == self._skipped and not restart:
      return
    if self._rebuild is None:
      raise ValueError("This iterator was built without a way to skip records (create it with create_train_iterator).")
    self._it = self._wrap(self._rebuild(records_to_skip(skipped, None, self.process_index, self.process_count)[0]))
    self._skipped = skipped

  def position(self) -> dict[str, Any]:
    """What any number of hosts needs to resume near here (JSON): the global count of examples consumed."""
    return {"examples_consumed": self.examples_consumed, "global_batch": self.global_batch,
            "epoch_size": self.num_examples, "state_saved": self._checkpoint, "skipped_at_start": self._skipped}

  def restore_position(self, position: dict[str, Any], *, exact: bool) -> tuple[bool, str]:
    """Adopts a saved `position()`; `exact`: `restore` follows, else moves the stream near it.

    Exact: the stream is rebuilt as the saving iterator's was (with the same
    records skipped at its start, if it was itself resumed this way), so that
    its tf.data state fits. Moving: this host skips `records_to_skip(...)` raw
    records of its files (read, not decoded) before the shuffle; the shuffle
    buffer, the file order and the random draws start afresh from the seed.
    Returns whether the stream is at (or near) the saved position, and what
    was done, for the log.
    """
    consumed = position.get("examples_consumed")
    self.examples_consumed = None if consumed is None else int(consumed)
    if exact:
      self._skip(int(position.get("skipped_at_start") or 0), restart=False)
      return True, "the saved state of this host's iterator"
    if consumed is None:
      return False, ("the checkpoint holds no global count of examples consumed (written before counts "
                     "were); this host reads its files from the start")
    if self._rebuild is None:
      return False, "this iterator cannot skip records; this host reads its files from the start"
    epoch = self.num_examples or position.get("epoch_size") or None
    skip, in_epoch = records_to_skip(int(consumed), epoch, self.process_index, self.process_count)
    self._skip(in_epoch, restart=True)
    epoch_text = f"{in_epoch} of them in the current epoch of {epoch}" if epoch else "the epoch size is unknown"
    detail = (f"{int(consumed)} examples consumed ({epoch_text}): the files are split over {self.process_count} "
              f"process(es) and this one (process {self.process_index}) skips {skip} raw records of its files "
              f"before the shuffle; the shuffle buffer and the random draws restart from the seed")
    return True, detail


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
  def build(skip_records: int = 0):
    return build_train_dataset(data_cfg, batch_size=batch_size, seed=seed, num_frames=num_frames,
                               image_size=image_size, process_index=process_index,
                               process_count=process_count, skip_records=skip_records)

  ds, info = build()
  return TrainIterator(ds, info, bool(data_cfg.checkpoint_iterator), global_batch=batch_size * process_count,
                       process_index=process_index, process_count=process_count,
                       rebuild=lambda skip: build(skip)[0])


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
