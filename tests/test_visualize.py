"""visualize (modulator maps + top-5 PNGs) and plots (training curves, confusion matrix)."""
import os

import numpy as np
import pytest
from flax import traverse_util
from matplotlib import image as matplotlib_image

from helpers import save_random_checkpoint, tiny_model_config
from vfocal_jax import plots, predict, resolve, visualize
from vfocal_jax.data.demo_dataset import render_video, write_mp4

NUM_CLASSES = 4
FRAMES, SIZE = 4, 32  # The tiny model's clip (helpers.tiny_model_config).


def _image(path):
  """The decoded RGB pixels of a PNG (float 0..1)."""
  return matplotlib_image.imread(path)[..., :3]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("visualize")
  model, params, checkpoint = save_random_checkpoint(root / "ckpt", tiny_model_config(NUM_CLASSES, crops=3), seed=1)
  return dict(root=root, model=model, params=params, checkpoint=checkpoint)


def test_visualize_figures_follow_the_input(converted, tmp_path):
  rng = np.random.default_rng(3)
  paths = []
  for i, label in enumerate((0, 5)):  # Two different videos (other shapes, motions, textures).
    path = str(tmp_path / f"clip{i}.mp4")
    write_mp4(path, render_video(label, rng, num_frames=10, height=48, width=64))
    paths.append(path)
  out_dir = str(tmp_path / "figures")
  loaded = resolve.artifact(resolve.UserConfig(), checkpoint=converted["checkpoint"])
  results = visualize.run(loaded, videos=paths + [paths[0]], output_dir=out_dir)

  for r in results:
    assert r["error"] is None
    assert len(r["top"]) == NUM_CLASSES and abs(sum(p for _, _, p in r["top"]) - 1) < 1e-4
    # First and last layer, spatial and temporal.
    assert sorted(r["maps"]) == sorted([
        "layers_0/blocks_0/modulation/spatial_modulator", "layers_0/blocks_0/modulation/temporal_modulator",
        "layers_3/blocks_0/modulation/spatial_modulator", "layers_3/blocks_0/modulation/temporal_modulator"])
    assert r["maps"]["layers_0/blocks_0/modulation/spatial_modulator"].shape == (FRAMES, SIZE // 4, SIZE // 4)
    assert r["maps"]["layers_3/blocks_0/modulation/temporal_modulator"].shape == (FRAMES, 1, 1)
  assert sorted(os.listdir(out_dir)) == ["clip0_2_modulators.png", "clip0_2_top5.png", "clip0_modulators.png",
                                         "clip0_top5.png", "clip1_modulators.png", "clip1_top5.png"]
  # The same video draws the same pixels; another video changes the modulator panel and its maps.
  first, second, again = (_image(r["modulators_png"]) for r in results)
  below_title = slice(first.shape[0] // 10, None)  # The titles name the files.
  np.testing.assert_array_equal(first[below_title], again[below_title])
  assert first.shape == second.shape and np.abs(first - second).mean() > 0.01
  for path, maps in results[0]["maps"].items():
    other = results[1]["maps"][path]
    assert np.abs(maps - other).max() > 1e-3 * np.abs(maps).max(), path
  assert np.ptp(results[0]["maps"]["layers_0/blocks_0/modulation/spatial_modulator"]) > 0
  # The top-5 chart draws the probabilities: bars of other lengths, other pixels.
  if results[0]["top"] != results[1]["top"]:
    assert np.abs(_image(results[0]["top5_png"]) - _image(results[1]["top5_png"])).mean() > 1e-3


def test_visualize_reports_unreadable_videos_and_fails(converted, tmp_path):
  bad = tmp_path / "broken.mp4"
  bad.write_bytes(b"\x00" * 100)
  with pytest.raises(predict.PredictionFailed, match="1 of 1"):
    visualize.run(resolve.artifact(resolve.UserConfig(), checkpoint=converted["checkpoint"]), videos=[str(bad)],
                  output_dir=str(tmp_path / "f"))


def test_magnitudes_are_channel_norms_of_the_sown_modulators(converted):
  """Against NumPy float64 norms of the raw intermediates of an independent apply."""
  clip = np.random.default_rng(0).integers(0, 256, size=(FRAMES, SIZE, SIZE, 3)).astype(np.uint8)
  affine = np.concatenate([np.eye(3) / 50.0, np.full((1, 3), -2.0), np.zeros((1, 3))]).astype(np.float32)
  logits, maps = visualize.modulator_magnitudes(converted["model"], converted["params"], clip, affine)
  normalised = (clip.astype(np.float32) / 50.0 - 2.0)[None]
  raw_logits, state = converted["model"].apply({"params": converted["params"]}, normalised, train=False,
                                              mutable=["intermediates"])
  np.testing.assert_allclose(logits, np.asarray(raw_logits)[0], rtol=1e-5, atol=1e-5)
  flat = traverse_util.flatten_dict(state["intermediates"], sep="/")
  sown = {k: v[0] for k, v in flat.items() if k.endswith("_modulator")}
  assert set(sown) == set(maps) and len(maps) == 8  # 4 blocks x (spatial, temporal).
  for key, value in sown.items():
    ref = np.sqrt((np.asarray(value, np.float64) ** 2).sum(-1))
    np.testing.assert_allclose(maps[key], ref, rtol=1e-4, atol=1e-6)


def test_upsample():
  const = np.full((2, 3, 3), 7.0, np.float32)
  np.testing.assert_allclose(visualize.upsample(const, 12, 9), 7.0, rtol=1e-6)
  ramp = np.tile(np.arange(4, dtype=np.float32), (1, 4, 1))  # (1, 4, 4): increases to the right.
  big = visualize.upsample(ramp, 16, 16)[0]
  assert big.shape == (16, 16) and np.all(np.diff(big[5]) >= 0) and big[5, -1] > big[5, 0]


def test_training_curves_and_confusion_matrix(tmp_path):
  from clu import metric_writers
  workdir = str(tmp_path / "run")
  writer = metric_writers.create_default_writer(workdir)
  for step in range(1, 21):
    writer.write_scalars(step, {"loss": 3.0 / step, "top1": step / 20, "learning_rate": 0.01 * step})
  writer.write_scalars(10, {"eval/top1": 40.0, "eval/top5": 80.0})
  writer.write_scalars(20, {"eval/top1": 55.0, "eval/top5": 90.0})
  writer.flush()
  scalars = plots.read_scalars(workdir)
  np.testing.assert_array_equal(scalars["loss"][0], np.arange(1, 21))
  np.testing.assert_allclose(scalars["loss"][1], 3.0 / np.arange(1, 21), rtol=1e-6)
  np.testing.assert_allclose(scalars["eval/top1"][1], [40.0, 55.0])
  png = plots.plot_training_curves(workdir, str(tmp_path / "curves.png"))
  other = str(tmp_path / "run2")
  writer = metric_writers.create_default_writer(other)
  for step in range(1, 21):
    writer.write_scalars(step, {"loss": 3.0 - 0.1 * step, "top1": 1 - step / 20, "learning_rate": 0.01 * step})
  writer.write_scalars(10, {"eval/top1": 70.0, "eval/top5": 85.0})
  writer.write_scalars(20, {"eval/top1": 20.0, "eval/top5": 30.0})
  writer.flush()
  png2 = plots.plot_training_curves(other, str(tmp_path / "curves2.png"), title="run")
  curves, curves2 = _image(png), _image(png2)
  assert curves.shape[1] > 300 and curves.std() > 0.05  # Not a blank canvas.
  assert curves.shape == curves2.shape and np.abs(curves - curves2).mean() > 1e-3  # Other curves, other pixels.

  rng = np.random.default_rng(0)
  labels, preds = rng.integers(0, 6, 300), rng.integers(0, 6, 300)
  cm = plots.confusion_matrix(labels, preds, 6)
  ref = np.zeros((6, 6), int)
  for y, p in zip(labels, preds):
    ref[y, p] += 1
  np.testing.assert_array_equal(cm, ref)
  names = [f"c{i}" for i in range(6)]
  png = plots.plot_confusion_matrix(cm, str(tmp_path / "cm" / "confusion.png"), names)
  diagonal = plots.plot_confusion_matrix(np.eye(6, dtype=int) * 50, str(tmp_path / "cm" / "eye.png"), names)
  a, b = _image(png), _image(diagonal)
  assert a.shape == b.shape and np.abs(a - b).mean() > 1e-3  # Other counts, other cells.
  big = plots.plot_confusion_matrix(np.eye(100, dtype=int) * 3, str(tmp_path / "cm100.png"))
  assert _image(big).shape[1] > 300
