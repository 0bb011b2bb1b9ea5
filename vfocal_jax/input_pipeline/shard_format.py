"""The on-disk shard format: TFRecord files of `tf.train.SequenceExample`.

DMVR / Scenic convention, one video per record:
  context   `clip/label/index` int64, `clip/label/text` bytes (optional),
            `video/filename` bytes (optional),
            `video/num_frames` int64 and `image/frame_index` int64 list
            (only in records that keep some of the frames,
            `make_shards --frames_per_video=M`: the video's frame count and
            the index in it of each stored frame, increasing)
  features  `image/encoded`: one JPEG string per stored frame, in display order.

A record without the two optional context features holds every frame
(today's layout, and other tools' shards): stored frame i is frame i.

Beside the shards the writer puts `dataset_info.json` (per-shard record
counts, class names, short side, `frames_per_video`, ...) and `labels.txt` (one class name per
line; line i is class i). Both are optional for reading: shards written by
other tools work, only without the per-shard counts (see `sources.py`).
"""
from __future__ import annotations

import tensorflow as tf

IMAGE_KEY = "image/encoded"
LABEL_INDEX_KEY = "clip/label/index"
LABEL_TEXT_KEY = "clip/label/text"
FILENAME_KEY = "video/filename"
NUM_FRAMES_KEY = "video/num_frames"
FRAME_INDEX_KEY = "image/frame_index"

INFO_FILENAME = "dataset_info.json"
LABELS_FILENAME = "labels.txt"


def make_sequence_example(jpeg_frames: list[bytes], label: int, *, label_text: str | None = None,
                          filename: str | None = None, frame_index: list[int] | None = None,
                          num_video_frames: int | None = None) -> tf.train.SequenceExample:
  """Builds one record from JPEG-encoded frames and an integer label.

  `frame_index` (the stored frames' indices in the video, increasing) and
  `num_video_frames` go together: give both for a record that keeps only
  some frames, neither for one that keeps them all.
  """
  if (frame_index is None) != (num_video_frames is None):
    raise ValueError("frame_index and num_video_frames go together.")
  seq = tf.train.SequenceExample()
  ctx = seq.context.feature
  ctx[LABEL_INDEX_KEY].int64_list.value.append(int(label))
  if label_text is not None:
    ctx[LABEL_TEXT_KEY].bytes_list.value.append(label_text.encode("utf-8"))
  if filename is not None:
    ctx[FILENAME_KEY].bytes_list.value.append(filename.encode("utf-8"))
  if frame_index is not None:
    if len(frame_index) != len(jpeg_frames):
      raise ValueError(f"{len(frame_index)} frame indices for {len(jpeg_frames)} frames.")
    ctx[FRAME_INDEX_KEY].int64_list.value.extend(int(i) for i in frame_index)
    ctx[NUM_FRAMES_KEY].int64_list.value.append(int(num_video_frames))
  frames = seq.feature_lists.feature_list[IMAGE_KEY]
  for jpeg in jpeg_frames:
    frames.feature.add().bytes_list.value.append(jpeg)
  return seq


def parse_sequence_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
  """Parses one serialized record into `frames` (JPEG strings), `label`, `filename`,
  `frame_index` (int32, empty when the record keeps every frame) and `num_video_frames`
  (int32, -1 then).

  Raises (inside tf.data) on a record that is not a SequenceExample; the
  pipeline turns that into a counted skip.
  """
  context, sequence = tf.io.parse_single_sequence_example(
      serialized,
      context_features={
          LABEL_INDEX_KEY: tf.io.FixedLenFeature([], tf.int64),
          FILENAME_KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
          NUM_FRAMES_KEY: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
          FRAME_INDEX_KEY: tf.io.VarLenFeature(tf.int64),
      },
      sequence_features={IMAGE_KEY: tf.io.FixedLenSequenceFeature([], tf.string)})
  return {
      "frames": sequence[IMAGE_KEY],
      "label": tf.cast(context[LABEL_INDEX_KEY], tf.int32),
      "filename": context[FILENAME_KEY],
      "frame_index": tf.cast(context[FRAME_INDEX_KEY].values, tf.int32),
      "num_video_frames": tf.cast(context[NUM_FRAMES_KEY], tf.int32),
  }
