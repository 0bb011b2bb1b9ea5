"""tfds: a locally built VideoCsv dataset and a mocked catalog dataset through the pipeline."""
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

import numbered_videos
from helpers import data_config
from vfocal_jax.data import tfds_builder
from vfocal_jax import input_pipeline as ip

LENGTHS = [6, 3, 9, 12]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  lines = numbered_videos.write_numbered_videos(root, LENGTHS, 32, 40, label=lambda vid: "ab"[vid % 2])
  (root / "bad.mkv").write_bytes(os.urandom(500))
  (root / "all.csv").write_text("".join(lines) + "bad.mkv,a\n")
  data_dir = root / "tfds_data"
  tfds_builder.prepare(str(data_dir), {"train": str(root / "all.csv"), "test": str(root / "all.csv")},
                       str(root), short_side=None)
  return str(data_dir)


def _cfg(**kw):
  return data_config(source="tfds", eval_resize_ratio=1.0, **kw)


@pytest.mark.parametrize("process_count", [1, 2])
def test_local_video_csv_dataset_through_eval_pipeline(prepared, process_count):
  cfg = _cfg(tfds_name="video_csv", tfds_data_dir=prepared)
  info = ip.get_dataset_info(cfg, "eval")
  assert info.num_examples == len(LENGTHS) and info.label_names == ("a", "b")   # bad.mkv left out
  seen, counts = [], []
  for p in range(process_count):
    ev = ip.create_eval_iterator(cfg, batch_size=3, num_frames=4, image_size=32, num_clips=1,
                                 num_crops=1, process_index=p, process_count=process_count)
    batches = list(ev)
    counts.append(len(batches))
    for b in batches:
      for video, label in zip(b["video"][b["mask"]], b["label"][b["mask"]]):
        pixels = video[0].astype(np.float64)        # uint8 pixels (the device normalises)
        vid = int(numbered_videos.video_number(pixels)[0])
        n = LENGTHS[vid]
        avg = n / 4.0
        np.testing.assert_array_equal(numbered_videos.frame_number(pixels),
                                      (np.arange(4) * avg + avg / 2).astype(int) % n)
        assert label == vid % 2
        seen.append(vid)
  assert sorted(seen) == list(range(len(LENGTHS))) and len(set(counts)) == 1


def test_local_video_csv_dataset_trains(prepared):
  cfg = _cfg(tfds_name="video_csv", tfds_data_dir=prepared, tfds_eval_split="test")
  batch = next(ip.create_train_iterator(cfg, batch_size=2, seed=0, num_frames=4, image_size=32))
  assert batch["video"].shape == (2, 4, 32, 32, 3) and set(batch["label"]) <= {0, 1}


def test_catalog_dataset_by_name_with_mock_data():
  cfg = _cfg(tfds_name="ucf101", tfds_eval_split="test", shuffle_buffer_size=2)
  with tfds.testing.mock_data(num_examples=5):
    assert ip.get_dataset_info(cfg, "train").num_classes == 101
    batch = next(ip.create_train_iterator(cfg, batch_size=2, seed=0, num_frames=4, image_size=32))
    assert batch["video"].shape == (2, 4, 32, 32, 3) and np.all(batch["label"] < 101)
    ev = ip.create_eval_iterator(cfg, batch_size=2, num_frames=4, image_size=32, num_clips=2, num_crops=3)
    batches = list(ev)
  assert sum(int(b["mask"].sum()) for b in batches) == 5
  assert batches[0]["video"].shape == (2, 6, 4, 32, 32, 3)
