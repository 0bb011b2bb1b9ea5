"""Bad records are skipped, counted and reported; the pipelines finish. Out-of-range labels stop them."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

import numbered_videos
from helpers import data_config
from vfocal_jax import input_pipeline as ip
from vfocal_jax.input_pipeline import pipeline, shard_format

GOOD = {0, 4, 5, 6}
NUM_BAD = 4


def _record(vid, n=6, label=None, jpegs=None):
  frames = numbered_videos.numbered_frames(vid, n, 32, 40)
  jpegs = jpegs if jpegs is not None else [tf.io.encode_jpeg(f, quality=95).numpy() for f in frames]
  return shard_format.make_sequence_example(jpegs, vid % 4 if label is None else label,
                                            filename=f"v{vid}").SerializeToString()


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
  """shard 0: good, garbage, corrupt JPEGs, no frames, good; shard 1: 3 good, truncated."""
  root = tmp_path_factory.mktemp("bad")
  good_jpeg = tf.io.encode_jpeg(numbered_videos.numbered_frames(2, 1, 32, 40)[0]).numpy()
  corrupt = good_jpeg[:40] + b"\x00" * 200 + good_jpeg[-40:]
  shard0 = [_record(0), os.urandom(300), _record(2, jpegs=[corrupt] * 4), _record(3, jpegs=[]), _record(4)]
  shard1 = [_record(5), _record(6), _record(7)]
  for name, records in (("shard-00000-of-00002.tfrecord", shard0), ("shard-00001-of-00002.tfrecord", shard1)):
    with tf.io.TFRecordWriter(str(root / name)) as w:
      for r in records:
        w.write(r)
  path1 = root / "shard-00001-of-00002.tfrecord"
  os.truncate(path1, os.path.getsize(path1) - 100)        # the last record is cut short
  info = {"num_examples": 8, "num_classes": 4, "label_names": None,
          "shards": {"shard-00000-of-00002.tfrecord": 5, "shard-00001-of-00002.tfrecord": 3}}
  (root / "dataset_info.json").write_text(json.dumps(info))
  return root


def _cfg(shard_dir):
  return data_config(shard_dir, shuffle_buffer_size=4)


def _ids(video):
  return numbered_videos.video_number(video.astype(np.float64)[..., 0, :, :, :])   # uint8 pixels


def test_eval_skips_counts_and_names_the_shard(bad_shards, capfd):
  ev = ip.create_eval_iterator(_cfg(bad_shards), batch_size=3, num_frames=2, image_size=32,
                               num_clips=1, num_crops=1)
  ids, skipped = [], []
  for batch in ev:
    ids += list(_ids(batch["video"][batch["mask"]][:, 0]))
    skipped.append(int(batch["num_skipped"]))
  assert sorted(ids) == sorted(GOOD)
  assert max(skipped) == NUM_BAD and len(skipped) == ev.num_batches == 3
  err = capfd.readouterr().err
  assert "shard-00000-of-00002.tfrecord" in err and "shard-00001-of-00002.tfrecord" in err


def test_train_keeps_going_and_counts_cumulatively(bad_shards):
  cfg = _cfg(bad_shards)
  cfg.color_jitter_prob = cfg.grayscale_prob = 0.0      # keep G = video id readable
  it = ip.create_train_iterator(cfg, batch_size=2, seed=0, num_frames=2, image_size=32)
  counts, ids = [], set()
  for _ in range(8):                               # 16 good clips = 4 passes over the data
    batch = next(it)
    counts.append(int(batch["num_skipped"]))
    ids |= set(_ids(batch["video"]))
    assert set(batch["label"]) <= {0, 1, 2, 3}
  assert ids == GOOD
  assert counts == sorted(counts) and counts[-1] >= 3 * NUM_BAD   # >= 3 whole passes seen


def test_without_dataset_info_counts_by_reading(bad_shards, tmp_path):
  for f in os.listdir(bad_shards):
    if f.endswith(".tfrecord"):
      (tmp_path / f).write_bytes((bad_shards / f).read_bytes())
  cfg = _cfg(tmp_path)
  cfg.num_classes = 4           # no dataset_info.json: the label range comes from the config
  ev = ip.create_eval_iterator(cfg, batch_size=4, num_frames=2, image_size=32,
                               num_clips=1, num_crops=1)
  batches = list(ev)
  ids = [i for b in batches for i in _ids(b["video"][b["mask"]][:, 0])]
  assert sorted(ids) == sorted(GOOD)
  # The truncated tail cannot be known without the per-shard counts; the rest is counted.
  assert max(int(b["num_skipped"]) for b in batches) == NUM_BAD - 1


@pytest.fixture(scope="module")
def label_shards(tmp_path_factory):
  """Two shards of good records; the second holds one with label 9 (of 4 classes)."""
  root = tmp_path_factory.mktemp("labels")
  for name, records in (("a.tfrecord", [_record(0), _record(1)]),
                        ("b.tfrecord", [_record(2), _record(5, label=9), _record(3)])):
    with tf.io.TFRecordWriter(str(root / name)) as w:
      for r in records:
        w.write(r)
  return root


@pytest.mark.parametrize("num_classes,bad", [(4, "label 9, outside [0, 4)"), (12, None)])
def test_train_refuses_a_label_outside_the_classes(label_shards, num_classes, bad):
  cfg = _cfg(label_shards)
  cfg.num_classes = num_classes
  it = ip.create_train_iterator(cfg, batch_size=2, seed=0, num_frames=2, image_size=32)
  if bad is None:   # the same data with enough classes trains
    assert all(int(next(it)["num_skipped"]) == 0 for _ in range(5))
    return
  with pytest.raises(pipeline.LabelOutOfRangeError) as info:
    for _ in range(5):                  # 10 clips: a pass over the 5 records and more
      next(it)
  message = str(info.value)
  assert str(label_shards / "b.tfrecord") in message and bad in message
  assert "data.num_classes" in message and "model.num_classes" in message


def test_eval_refuses_a_label_outside_the_classes(label_shards):
  cfg = _cfg(label_shards)
  cfg.num_classes = 4
  with pytest.raises(ValueError, match=r"b\.tfrecord: a record has label 9, outside \[0, 4\)"):
    list(ip.create_eval_iterator(cfg, batch_size=2, num_frames=2, image_size=32, num_clips=1, num_crops=1))
