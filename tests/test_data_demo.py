"""The synthetic motion dataset: built through the real writer, classes need motion."""
import numpy as np
import pytest

from helpers import data_config
from vfocal_jax.data import demo_dataset
from vfocal_jax import input_pipeline as ip


def _shape_stats(frame):
  """Centroid (x, y) and area of the shape: with no noise it is the one most frequent exact colour."""
  colours, counts = np.unique(frame.reshape(-1, 3), axis=0, return_counts=True)
  mask = np.all(frame == colours[np.argmax(counts)], axis=-1)
  ys, xs = np.nonzero(mask)
  return xs.mean(), ys.mean(), mask.sum()


def test_render_video_moves_as_labelled():
  rng = np.random.default_rng(0)
  names = demo_dataset.CLASS_NAMES
  assert list(names) == sorted(names) and len(names) == 8
  for _ in range(6):
    for label, name in enumerate(names):
      video = demo_dataset.render_video(label, rng, num_frames=12, height=64, width=80, noise=0)
      assert video.shape == (12, 64, 80, 3) and video.dtype == np.uint8
      (x0, y0, a0), (x1, y1, a1) = _shape_stats(video[0]), _shape_stats(video[-1])
      dx, dy, ratio = x1 - x0, y1 - y0, a1 / a0
      expected = {"move_left": dx < -8, "move_right": dx > 8, "move_up": dy < -8, "move_down": dy > 8,
                  "grow": ratio > 1.5, "shrink": ratio < 1 / 1.5}
      if name in expected:
        assert expected[name], (name, dx, dy, ratio)
      else:   # rotations: the shape turns about a point near its centroid
        assert abs(dx) < 10.5 and abs(dy) < 10.5 and 0.7 < ratio < 1.4, (name, dx, dy, ratio)
        assert np.abs(video[-1].astype(int) - video[0]).sum(-1).astype(bool).mean() > 0.01


def test_build_tiny_demo_dataset(tmp_path):
  out = demo_dataset.build_demo_dataset(str(tmp_path), train_per_class=1, val_per_class=1,
                                        num_frames=6, height=32, width=40, num_train_shards=2,
                                        num_val_shards=1, workers=1)
  assert out["class_names"] == list(demo_dataset.CLASS_NAMES)
  assert out["train_info"]["num_examples"] == 8 and out["val_info"]["num_examples"] == 8
  assert out["train_info"]["label_names"] == list(demo_dataset.CLASS_NAMES)
  assert out["val_info"]["num_failed"] == 0
  cfg = data_config(train_shards=out["train_dir"], eval_shards=out["val_dir"])
  ev = ip.create_eval_iterator(cfg, batch_size=8, num_frames=4, image_size=32, num_clips=1, num_crops=1)
  batch = next(iter(ev))
  assert sorted(batch["label"][batch["mask"]]) == list(range(8))


def test_oversampled_video_films_the_same_motion_at_a_higher_frame_rate():
  """oversample=3: frame 3t + 1 is plain frame t (same draws; noise off), the others lie between."""
  for label in range(len(demo_dataset.CLASS_NAMES)):
    plain = demo_dataset.render_video(label, np.random.default_rng(label), num_frames=6, noise=0)
    fine = demo_dataset.render_video(label, np.random.default_rng(label), num_frames=6, noise=0, oversample=3)
    assert fine.shape == (18,) + plain.shape[1:]
    np.testing.assert_array_equal(fine[1::3], plain)
    assert not np.array_equal(fine[0], fine[1])   # a step between plain frames moves


def test_prepare_refuses_demo_data_built_with_other_settings(tmp_path):
  from vfocal_jax.configs import demo
  (tmp_path / "demo_data").mkdir()
  (tmp_path / "demo_data" / "DONE").write_text('{"oversample": 4, "frames_per_video": 16}')
  config = demo.get_config()
  with pytest.raises(ValueError, match="built with config.demo_dataset .*oversample.*--workdir"):
    demo_dataset.prepare(config, str(tmp_path))
  config.demo_dataset.oversample, config.demo_dataset.frames_per_video = 4, 16
  assert demo_dataset.prepare(config, str(tmp_path)).data.train_shards == str(tmp_path / "demo_data" / "train")
