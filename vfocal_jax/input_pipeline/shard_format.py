"""The on-disk shard format: TFRecord files of `tf.train.SequenceExample`.

DMVR / Scenic convention, one video per record:
  context   `clip/label/index` int64, `clip/label/text` bytes (optional),
            `video/filename` bytes (optional)
  features  `image/encoded`: one JPEG string per frame, in display order.

Beside the shards the writer puts `dataset_info.json` (per-shard record
counts, class names, short side, ...) and `labels.txt` (one class name per
line; line i is class i). Both are optional for reading: shards written by
other tools work, only without the per-shard counts (see `sources.py`).
"""
from __future__ import annotations

import tensorflow as tf

IMAGE_KEY = "image/encoded"
LABEL_INDEX_KEY = "clip/label/index"
LABEL_TEXT_KEY = "clip/label/text"
FILENAME_KEY = "video/filename"

INFO_FILENAME = "dataset_info.json"
LABELS_FILENAME = "labels.txt"


def make_sequence_example(jpeg_frames: list[bytes], label: int, *, label_text: str | None = None,
                          filename: str | None = None) -> tf.train.SequenceExample:
  """Builds one record from JPEG-encoded frames and an integer label."""
  seq = tf.train.SequenceExample()
  ctx = seq.context.feature
  ctx[LABEL_INDEX_KEY].int64_list.value.append(int(label))
  if label_text is not None:
    ctx[LABEL_TEXT_KEY].bytes_list.value.append(label_text.encode("utf-8"))
  if filename is not None:
    ctx[FILENAME_KEY].bytes_list.value.append(filename.encode("utf-8"))
  frames = seq.feature_lists.feature_list[IMAGE_KEY]
  for jpeg in jpeg_frames:
    frames.feature.add().bytes_list.value.append(jpeg)
  return seq


def parse_sequence_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
  """Parses one serialized record into `frames` (JPEG strings), `label`, `filename`.

  Raises (inside tf.data) on a record that is not a SequenceExample; the
  pipeline turns that into a counted skip.
  """
  context, sequence = tf.io.parse_single_sequence_example(
      serialized,
      context_features={
          LABEL_INDEX_KEY: tf.io.FixedLenFeature([], tf.int64),
          FILENAME_KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
      },
      sequence_features={IMAGE_KEY: tf.io.FixedLenSequenceFeature([], tf.string)})
  return {
      "frames": sequence[IMAGE_KEY],
      "label": tf.cast(context[LABEL_INDEX_KEY], tf.int32),
      "filename": context[FILENAME_KEY],
  }
