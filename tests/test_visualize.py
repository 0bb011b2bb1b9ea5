"""visualize (modulator maps + top-5 PNGs) and plots (training curves, confusion matrix)."""
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from vfocal_jax.data.demo_dataset import render_video, write_mp4
from vfocal_jax import plots, visualize

NUM_CLASSES = 4
FRAMES = 4
SIZE = 32
MODEL = dict(variant="custom", embed_dim=8, depths=(1, 1, 1, 1), focal_levels=(1, 1, 1, 1),
             focal_windows=(3, 3, 3, 3), num_frames=FRAMES, num_classes=NUM_CLASSES, drop_path_rate=0.0)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

def _model_landed():
  try:
    from vfocal_jax.models import create_model  # noqa: F401
  except ImportError:
    return False
  return True


needs_model = pytest.mark.skipif(not _model_landed(), reason="vfocal_jax.models.create_model has not landed yet")


def _png_size(path):
  with open(path, "rb") as f:
    head = f.read(24)
  assert head[:8] == PNG_MAGIC, path
  return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  from vfocal_jax import params_io
  from vfocal_jax.models import create_model
  root = tmp_path_factory.mktemp("visualize")
  model = create_model(**MODEL, dtype=np.float32)
  params = model.init(jax.random.key(1), np.zeros((1, FRAMES, SIZE, SIZE, 3), np.float32), train=False)["params"]
  params = jax.tree.map(np.asarray, params)
  return dict(root=root, model=model, params=params,
              checkpoint=params_io.save_params(root / "ckpt", params, MODEL))


def _config():
  from vfocal_jax.configs import default
  config = default.get_config()
  config.num_frames, config.image_size = FRAMES, SIZE
  config.test_num_clips, config.test_num_crops = 1, 3
  config.model.dtype = "float32"
  return config


@needs_model
def test_visualize_writes_pngs_and_maps_follow_the_input(converted, tmp_path):
  rng = np.random.default_rng(3)
  paths = []
  for i, label in enumerate((0, 5)):  # Two different videos (other shapes, motions, textures).
    path = str(tmp_path / f"clip{i}.mp4")
    write_mp4(path, render_video(label, rng, num_frames=10, height=48, width=64))
    paths.append(path)
  bad = str(tmp_path / "broken.mp4")
  with open(bad, "wb") as f:
    f.write(b"\x00" * 100)
  out_dir = str(tmp_path / "figures")
  results = visualize.run(_config(), checkpoint=converted["checkpoint"], videos=paths + [bad], output_dir=out_dir)

  assert results[2]["error"] and "broken.mp4" in results[2]["video"]
  for r in results[:2]:
    assert r["error"] is None
    for key in ("modulators_png", "top5_png"):
      assert os.path.getsize(r[key]) > 2000
      width, height = _png_size(r[key])
      assert width > 200 and height > 100
    assert len(r["top"]) == NUM_CLASSES and abs(sum(p for _, _, p in r["top"]) - 1) < 1e-4
    # First and last layer, spatial and temporal.
    assert sorted(r["maps"]) == sorted([
        "layers_0/blocks_0/modulation/spatial_modulator", "layers_0/blocks_0/modulation/temporal_modulator",
        "layers_3/blocks_0/modulation/spatial_modulator", "layers_3/blocks_0/modulation/temporal_modulator"])
    assert r["maps"]["layers_0/blocks_0/modulation/spatial_modulator"].shape == (FRAMES, SIZE // 4, SIZE // 4)
    assert r["maps"]["layers_3/blocks_0/modulation/temporal_modulator"].shape == (FRAMES, 1, 1)
  assert sorted(os.listdir(out_dir)) == ["clip0_modulators.png", "clip0_top5.png",
                                         "clip1_modulators.png", "clip1_top5.png"]
  # Another video, other maps (and a map is not flat).
  for path, first in results[0]["maps"].items():
    second = results[1]["maps"][path]
    assert np.abs(first - second).max() > 1e-3 * np.abs(first).max(), path
  assert np.ptp(results[0]["maps"]["layers_0/blocks_0/modulation/spatial_modulator"]) > 0


@needs_model
def test_magnitudes_are_channel_norms_of_the_sown_modulators(converted):
  """Against NumPy float64 norms of the raw intermediates of an independent apply."""
  clip = np.random.default_rng(0).normal(size=(FRAMES, SIZE, SIZE, 3)).astype(np.float32)
  logits, maps = visualize.modulator_magnitudes(converted["model"], converted["params"], clip)
  raw_logits, state = converted["model"].apply({"params": converted["params"]}, clip[None], train=False,
                                              mutable=["intermediates"])
  np.testing.assert_allclose(logits, np.asarray(raw_logits)[0], rtol=1e-5, atol=1e-5)
  flat = traverse_util.flatten_dict(state["intermediates"], sep="/")
  sown = {k: v[0] for k, v in flat.items() if k.endswith("_modulator")}
  assert set(sown) == set(maps) and len(maps) == 8  # 4 blocks x (spatial, temporal).
  for key, value in sown.items():
    ref = np.sqrt((np.asarray(value, np.float64) ** 2).sum(-1))
    np.testing.assert_allclose(maps[key], ref, rtol=1e-4, atol=1e-6)


def test_upsample_and_display_helpers():
  const = np.full((2, 3, 3), 7.0, np.float32)
  np.testing.assert_allclose(visualize.upsample(const, 12, 9), 7.0, rtol=1e-6)
  ramp = np.tile(np.arange(4, dtype=np.float32), (1, 4, 1))  # (1, 4, 4): increases to the right.
  big = visualize.upsample(ramp, 16, 16)[0]
  assert big.shape == (16, 16) and np.all(np.diff(big[5]) >= 0) and big[5, -1] > big[5, 0]
  from vfocal_jax.input_pipeline import data_config_defaults
  cfg = data_config_defaults()
  pixels = np.array([[[[0, 128, 255]]]], np.uint8)
  normed = (pixels - np.asarray(cfg.mean)) / np.asarray(cfg.std)
  np.testing.assert_array_equal(visualize.clip_for_display(normed, cfg), pixels)


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
  assert _png_size(png)[0] > 300

  rng = np.random.default_rng(0)
  labels, preds = rng.integers(0, 6, 300), rng.integers(0, 6, 300)
  cm = plots.confusion_matrix(labels, preds, 6)
  ref = np.zeros((6, 6), int)
  for y, p in zip(labels, preds):
    ref[y, p] += 1
  np.testing.assert_array_equal(cm, ref)
  png = plots.plot_confusion_matrix(cm, str(tmp_path / "cm" / "confusion.png"), [f"c{i}" for i in range(6)])
  assert os.path.getsize(png) > 2000
  big = plots.plot_confusion_matrix(np.eye(100, dtype=int) * 3, str(tmp_path / "cm100.png"))
  assert _png_size(big)[0] > 300
