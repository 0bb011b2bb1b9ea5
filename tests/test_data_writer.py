"""The shard writer: videos with numbered frames -> shards, read back with plain TF."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

import numbered_videos
from vfocal_jax.data import make_shards
from vfocal_jax.input_pipeline import VideoDecodeError, decode_video_file

LENGTHS = [12, 5, 20, 3, 9]
NAMES = ["walk", "jump", "run"]  # label of video v: NAMES[v % 3]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
  root = tmp_path_factory.mktemp("videos")
  lines = numbered_videos.write_numbered_videos(root, LENGTHS, 32, 48, label=lambda vid: NAMES[vid % 3])
  (root / "broken.mkv").write_bytes(os.urandom(2000))
  (root / "notes.txt").write_text("Not a video: FFmpeg reads text files as ANSI art.\n" * 20)
  lines.insert(2, "broken.mkv,walk\n")
  lines.insert(4, "notes.txt,jump\n")
  lines.append("missing.mkv,run\n")
  (root / "train.csv").write_text("".join(lines))
  return root


def _read_shards(directory):
  out = {}
  for f in sorted(os.listdir(directory)):
    if not f.endswith(".tfrecord"):
      continue
    for rec in tf.data.TFRecordDataset(os.path.join(directory, f)):
      ctx, seq = tf.io.parse_single_sequence_example(
          rec, context_features={"clip/label/index": tf.io.FixedLenFeature([], tf.int64),
                                 "clip/label/text": tf.io.FixedLenFeature([], tf.string),
                                 "video/filename": tf.io.FixedLenFeature([], tf.string)},
          sequence_features={"image/encoded": tf.io.FixedLenSequenceFeature([], tf.string)})
      frames = np.stack([tf.io.decode_jpeg(j).numpy() for j in seq["image/encoded"]])
      out[ctx["video/filename"].numpy().decode()] = (
          int(ctx["clip/label/index"]), ctx["clip/label/text"].numpy().decode(), frames, f)
  return out


def test_decode_video_file_reads_every_frame_in_order(videos):
  frames = decode_video_file(videos / "v2.mkv")
  assert frames.shape == (20, 32, 48, 3) and frames.dtype == np.uint8
  np.testing.assert_array_equal(numbered_videos.frame_number(frames.astype(float)), np.arange(20))
  small = decode_video_file(videos / "v2.mkv", short_side=16, max_fps=5)
  assert small.shape == (10, 16, 24, 3)   # 10 fps -> 5 fps keeps every other frame
  np.testing.assert_array_equal(numbered_videos.frame_number(small.astype(float)), np.arange(0, 20, 2))


def test_decode_video_file_raises_clearly(videos):
  with pytest.raises(VideoDecodeError, match="broken.mkv"):
    decode_video_file(videos / "broken.mkv")
  with pytest.raises(VideoDecodeError, match="notes.txt: not a video"):
    decode_video_file(videos / "notes.txt")
  with pytest.raises(VideoDecodeError, match="no such file"):
    decode_video_file(videos / "missing.mkv")


def test_writer_roundtrip_labels_report_and_resume(videos, tmp_path):
  out = tmp_path / "train"
  info = make_shards.make_shards(str(videos / "train.csv"), str(out), 3, video_root=str(videos),
                                 short_side=None, jpeg_quality=95, workers=1, progress=False)
  records = _read_shards(out)
  assert sorted(records) == [f"v{v}.mkv" for v in range(len(LENGTHS))]
  sorted_names = sorted(NAMES)
  for vid, n in enumerate(LENGTHS):
    label, text, frames, _ = records[f"v{vid}.mkv"]
    assert text == NAMES[vid % 3] and label == sorted_names.index(text)
    assert frames.shape == (n, 32, 48, 3)
    np.testing.assert_array_equal(numbered_videos.frame_number(frames.astype(float)), np.arange(n))
    np.testing.assert_array_equal(numbered_videos.video_number(frames.astype(float)), vid)
  assert (out / "labels.txt").read_text().split() == sorted_names
  on_disk = json.loads((out / "dataset_info.json").read_text())
  assert on_disk == info and info["num_examples"] == 5 and info["num_failed"] == 3
  assert sum(info["shards"].values()) == 5 and len(info["shards"]) == 3
  report = dict(line.split("\t", 1) for line in (out / "failed_videos.txt").read_text().splitlines())
  assert sorted(report) == ["broken.mkv", "missing.mkv", "notes.txt"]
  assert "not a video" in report["notes.txt"] and "no such file" in report["missing.mkv"]

  # Resume: only the missing shard is written again.
  shard1 = out / make_shards.shard_name(1, 3)
  others = [out / make_shards.shard_name(i, 3) for i in (0, 2)]
  mtimes = [os.stat(p).st_mtime_ns for p in others]
  os.remove(shard1)
  os.remove(str(shard1) + ".json")
  again = make_shards.make_shards(str(videos / "train.csv"), str(out), 3, video_root=str(videos),
                                  short_side=None, jpeg_quality=95, workers=1, progress=False)
  assert [os.stat(p).st_mtime_ns for p in others] == mtimes
  assert shard1.exists() and again["shards"] == info["shards"]
  assert sorted(_read_shards(out)) == sorted(records)
  # Other settings: nothing is kept.
  make_shards.make_shards(str(videos / "train.csv"), str(out), 3, video_root=str(videos),
                          short_side=None, jpeg_quality=80, workers=1, progress=False)
  assert all(os.stat(p).st_mtime_ns != m for p, m in zip(others, mtimes))


def test_writer_reuses_label_map_and_reports_unknown_labels(videos, tmp_path):
  label_map = tmp_path / "labels.txt"
  label_map.write_text("jump\nrun\nwalk\nswim\n")
  csv = tmp_path / "val.csv"
  csv.write_text("v0.mkv,swim\nv1.mkv,fly\nv3.mkv,2\n")
  out = tmp_path / "val"
  info = make_shards.make_shards(str(csv), str(out), 1, video_root=str(videos), short_side=16,
                                 workers=1, label_map=str(label_map), progress=False)
  records = _read_shards(out)
  assert {k: v[:2] for k, v in records.items()} == {"v0.mkv": (3, "swim"), "v3.mkv": (2, "walk")}
  assert records["v0.mkv"][2].shape[1:] == (16, 24, 3)
  assert info["num_classes"] == 4 and info["num_failed"] == 1
  assert (out / "failed_videos.txt").read_text().startswith("v1.mkv\t")
