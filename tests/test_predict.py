"""predict: same top class as the eval path on the same views; unreadable videos reported and skipped.

A tiny random Video-FocalNet is saved as a converted checkpoint (and as a
training workdir); generated H.264 videos go through `predict.run`. The
reference is independent of predict's batching: each video's views (made
by the input pipeline's own `eval_views_from_frames`) go one view at a time
through `model.apply`, and the softmax is summed in NumPy float64; the eval
path's jitted `evaluate.eval_step` must then count predict's top-1 as
correct for every video.
"""
import csv
import os

import jax
import ml_collections
import numpy as np
import pytest

from vfocal_jax.data.demo_dataset import render_video, write_mp4
from vfocal_jax import evaluate, pixels, predict
from vfocal_jax.input_pipeline import decode_video_file, eval_views_from_frames

if not hasattr(pytest.importorskip("vfocal_jax.models"), "create_model"):
  pytest.skip("vfocal_jax.models.create_model has not landed yet", allow_module_level=True)

NUM_CLASSES = 5
FRAMES = 4
SIZE = 32
MODEL = dict(variant="custom", embed_dim=8, depths=(1, 1, 1, 1), focal_levels=(1, 1, 1, 1),
             focal_windows=(3, 3, 3, 3), num_frames=FRAMES, num_classes=NUM_CLASSES, drop_path_rate=0.0)
CLASS_NAMES = ["alpha", "beta", "gamma", "delta", "epsilon"]


def _config(model_kwargs=None):
  from vfocal_jax.configs import default
  config = default.get_config()
  config.num_frames = FRAMES
  config.image_size = SIZE
  config.test_num_clips = 2
  config.test_num_crops = 3
  config.model.dtype = "float32"
  if model_kwargs:
    for k, v in model_kwargs.items():
      config.model[k] = v
  return config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  from vfocal_jax import params_io
  from vfocal_jax.models import create_model
  root = tmp_path_factory.mktemp("predict")
  model = create_model(**MODEL, dtype=np.float32)
  params = model.init(jax.random.key(0), np.zeros((1, FRAMES, SIZE, SIZE, 3), np.float32), train=False)["params"]
  # Make the random head decisive enough that the top class is not a float tie.
  params = jax.tree.map(np.asarray, params)
  params["head"]["kernel"] = params["head"]["kernel"] * 20.0
  checkpoint = params_io.save_params(root / "converted", params, MODEL)
  rng = np.random.default_rng(0)
  videos = []
  for i, (h, w, n) in enumerate([(48, 64, 12), (40, 40, 9), (64, 48, 20)]):
    path = str(root / f"video_{i}.mp4")
    write_mp4(path, render_video(i, rng, num_frames=n, height=h, width=w))
    videos.append(path)
  garbage = root / "garbage.mp4"
  garbage.write_bytes(b"this is not a video" * 10)
  labels = root / "labels.csv"
  labels.write_text("id,name\n" + "".join(f"{i},{n}\n" for i, n in enumerate(CLASS_NAMES)))
  return dict(root=root, model=model, params=params, checkpoint=checkpoint, videos=videos,
              garbage=str(garbage), missing=str(root / "missing.mp4"), labels=str(labels))


def _reference_probs(model, params, path, config):
  """Float64 softmax summed over the views, each view through model.apply on its own."""
  views = eval_views_from_frames(decode_video_file(path), num_frames=FRAMES, image_size=SIZE,
                                 num_clips=config.test_num_clips, num_crops=config.test_num_crops,
                                 data_cfg=config.data)
  assert views.shape == (config.test_num_clips * config.test_num_crops, FRAMES, SIZE, SIZE, 3)
  total = np.zeros(NUM_CLASSES, np.float64)
  for view in views:
    logits = np.asarray(model.apply({"params": params}, view[None], train=False), np.float64)[0]
    p = np.exp(logits - logits.max())
    total += p / p.sum()
  return total, views


def test_predict_matches_eval_path_and_skips_unreadable(setup, tmp_path, capsys):
  config = _config()
  paths = [setup["videos"][0], setup["garbage"], setup["videos"][1], setup["missing"], setup["videos"][2]]
  out_csv = str(tmp_path / "out" / "predictions.csv")
  results = predict.run(config, checkpoint=setup["checkpoint"], videos=",".join(paths), labels=setup["labels"],
                        output_csv=out_csv, batch_size=2)
  printed = capsys.readouterr().out
  assert [r["video"] for r in results] == paths

  # Unreadable files: reported (result, terminal, CSV), no prediction; the others predicted.
  for bad in (results[1], results[3]):
    assert bad["error"] and not bad["top"] and bad["probs"] is None
  assert "3 of 5 videos predicted" in printed and setup["garbage"] in printed and setup["missing"] in printed

  good = [results[0], results[2], results[4]]
  eval_views, eval_labels = [], []
  for r in good:
    ref, views = _reference_probs(setup["model"], setup["params"], r["video"], config)
    assert r["error"] is None and r["num_views"] == 6
    assert r["top"][0][0] == int(np.argmax(ref))
    np.testing.assert_allclose(r["probs"], ref / ref.sum(), atol=2e-5)
    assert [i for i, _, _ in r["top"]] == list(np.argsort(-ref, kind="stable")[:5])
    assert r["top"][0][1] == CLASS_NAMES[r["top"][0][0]]
    eval_views.append(views)
    eval_labels.append(r["top"][0][0])

  # The eval path's jitted step counts predict's top-1 as correct for every video.
  batch = pixels.with_pixel_affine(
      {"video": np.stack(eval_views), "label": np.asarray(eval_labels, np.int32), "mask": np.ones(3, bool)})
  counts = jax.jit(lambda p, b: evaluate.eval_step(p, b, model=setup["model"], num_classes=NUM_CLASSES))(
      setup["params"], batch)
  assert int(counts["count"]) == 3 and int(counts["correct1"]) == 3

  with open(out_csv, newline="") as f:
    rows = list(csv.DictReader(f))
  assert [row["video"] for row in rows] == paths
  assert rows[1]["error"] and rows[3]["error"] and not rows[1]["class_1"]
  for row, r in zip([rows[0], rows[2], rows[4]], good):
    assert row["error"] == ""
    assert row["class_1"] == r["top"][0][1] and int(row["index_1"]) == r["top"][0][0]
    assert abs(float(row["prob_1"]) - r["top"][0][2]) < 1e-5


def test_predict_from_workdir_and_csv_list(setup, tmp_path):
  """--workdir: the run's config.json and latest checkpoint; --video: one CSV of paths."""
  from vfocal_jax import checkpoints
  workdir = str(tmp_path / "run")
  config = _config(dict(MODEL))
  config.test_num_clips, config.test_num_crops = 1, 1
  checkpoints.write_config(workdir, config)
  manager = checkpoints.create_manager(workdir, keep=2, keep_best=0, async_save=False)
  zeros = jax.tree.map(np.zeros_like, setup["params"])
  checkpoints.save(manager, 1, {"params": zeros, "step": 1}, force=True)
  checkpoints.save(manager, 2, {"params": setup["params"], "step": 2}, force=True)
  manager.wait_until_finished()
  manager.close()
  listing = tmp_path / "videos.csv"
  listing.write_text("path,label\n" + "".join(f"{os.path.basename(v)},0\n" for v in setup["videos"][:2]))
  os.symlink(setup["videos"][0], tmp_path / os.path.basename(setup["videos"][0]))
  os.symlink(setup["videos"][1], tmp_path / os.path.basename(setup["videos"][1]))
  results = predict.run(ml_collections.ConfigDict(), workdir=workdir, videos=[str(listing)])
  assert [os.path.basename(r["video"]) for r in results] == [os.path.basename(v) for v in setup["videos"][:2]]
  for r in results:
    assert r["error"] is None and r["num_views"] == 1
    ref, _ = _reference_probs(setup["model"], setup["params"], r["video"], config)
    assert r["top"][0][0] == int(np.argmax(ref))  # The latest step's params, not the zeros of step 1.
    np.testing.assert_allclose(r["probs"], ref, atol=2e-5)
