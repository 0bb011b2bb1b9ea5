"""predict: batching, padding and list handling agree with per-view NumPy references; failures are reported.

A tiny random Video-FocalNet is saved as a converted checkpoint with its card
(2 clips x 3 crops) and as a training workdir (1 x 1). The videos are
lossless (FFV1) with known frames whose short side is the input size, so the
reference views are cut in NumPy (`reference_views`), independently of the
pipeline; each view goes through `model.apply` on its own and the softmax is
averaged in float64. The eval path's jitted step must count predict's top-1
as correct for every video.
"""
import csv
import os

import jax
import numpy as np
import pytest

from helpers import NUM_CLASSES, save_random_checkpoint, tiny_model_config
from reference_views import MEAN, STD, eval_views, write_video
from vfocal_jax import checkpoints, evaluate, model_card, predict, resolve
from vfocal_jax.configs import demo

FRAMES, SIZE = 4, 32  # The tiny model's clip (helpers.tiny_model_config).
INTERVAL = 4  # The K400 recipe's frame_interval (configs/default.py).
CLASS_NAMES = ["alpha", "beta", "gamma", "delta", "epsilon"]


def _config(clips=2, crops=3):
  return tiny_model_config(clips=clips, crops=crops)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("predict")
  # A decisive head (scaled by 20): no float ties at the top.
  model, params, checkpoint = save_random_checkpoint(root / "converted", _config(), head_scale=20.0,
                                                     class_names=CLASS_NAMES)
  rng = np.random.default_rng(0)
  videos = []
  for i, (h, w, n) in enumerate([(32, 48, 12), (48, 32, 9), (32, 32, 20)]):  # wide, tall, square
    frames = rng.integers(0, 256, (n, h, w, 3)).astype(np.uint8)
    path = root / f"video_{i}.mkv"
    write_video(str(path), frames)
    videos.append((str(path), frames))
  garbage = root / "garbage.mp4"
  garbage.write_bytes(b"this is not a video" * 10)
  return dict(root=root, model=model, params=params, checkpoint=checkpoint, videos=videos, garbage=str(garbage),
              missing=str(root / "missing.mp4"))


def _reference_probs(model, params, frames, clips, crops):
  views = eval_views(frames, num_frames=FRAMES, size=SIZE, clips=clips, crops=crops, interval=INTERVAL)
  forward = jax.jit(lambda x: model.apply({"params": params}, x, train=False))  # a plain forward, one view at a time
  probs = []
  for view in views:
    logits = np.asarray(forward(view[None].astype(np.float32)), np.float64)[0]
    p = np.exp(logits - logits.max())
    probs.append(p / p.sum())
  return np.mean(probs, axis=0)


def test_predict_matches_references_reports_failures_and_writes_csv(setup, tmp_path, capsys):
  (v0, f0), (v1, f1), (v2, f2) = setup["videos"]
  paths = [v0, setup["garbage"], v1, setup["missing"], v2]
  out_csv = str(tmp_path / "out" / "predictions.csv")
  with pytest.raises(predict.PredictionFailed, match="2 of 5"):
    predict.run(resolve.artifact(resolve.UserConfig(demo.get_config()), checkpoint=setup["checkpoint"]),
                videos=",".join(paths), output_csv=out_csv,
                batch_size=2)
  printed = capsys.readouterr().out
  assert "3 of 5 videos predicted" in printed and setup["garbage"] in printed and setup["missing"] in printed

  loaded = resolve.artifact(resolve.UserConfig(demo.get_config()), checkpoint=setup["checkpoint"])
  results = predict.predict_videos(loaded, paths, batch_size=2, class_names=CLASS_NAMES)
  assert [r["video"] for r in results] == paths
  for bad in (results[1], results[3]):
    assert bad["error"] and not bad["top"] and bad["probs"] is None
  good = [(results[0], f0), (results[2], f1), (results[4], f2)]
  eval_videos, eval_labels = [], []
  for r, frames in good:
    ref = _reference_probs(setup["model"], setup["params"], frames, 2, 3)
    assert r["error"] is None and r["num_views"] == 6
    np.testing.assert_allclose(r["probs"], ref, atol=2e-6)
    assert [i for i, _, _ in r["top"]] == list(np.argsort(-ref, kind="stable")[:5])
    assert r["top"][0][1] == CLASS_NAMES[r["top"][0][0]]
    eval_videos.append(eval_views(frames, num_frames=FRAMES, size=SIZE, clips=2, crops=3, interval=INTERVAL,
                                  normalise=False))
    eval_labels.append(r["top"][0][0])

  # The eval path's jitted step counts predict's top-1 as correct for every video.
  affine = np.concatenate([np.diag(1 / STD), (-MEAN / STD)[None], np.zeros((1, 3))]).astype(np.float32)
  batch = {"video": np.stack(eval_videos), "pixel_affine": np.stack([affine] * 3),
           "label": np.asarray(eval_labels, np.int32), "mask": np.ones(3, bool)}
  counts = jax.jit(lambda p, b: evaluate.eval_step(p, b, model=setup["model"], num_classes=NUM_CLASSES))(
      setup["params"], batch)
  assert int(counts["count"]) == 3 and int(counts["correct1"]) == 3

  with open(out_csv, newline="") as f:
    rows = list(csv.DictReader(f))
  assert [row["video"] for row in rows] == paths
  assert rows[1]["error"] and rows[3]["error"] and not rows[1]["class_1"]
  for row, (r, _) in zip([rows[0], rows[2], rows[4]], good):
    assert row["error"] == ""
    assert row["class_1"] == r["top"][0][1] and int(row["index_1"]) == r["top"][0][0]
    assert abs(float(row["prob_1"]) - r["top"][0][2]) < 1e-5


def test_predict_from_workdir_and_csv_list(setup, tmp_path):
  """--workdir: the run's card and latest checkpoint; --video: one CSV of paths, relative to the list."""
  workdir = str(tmp_path / "run")
  config = _config(clips=1, crops=1)
  config.data.eval_resize_ratio = 1.0  # One centre crop of the frames as they are (the reference has no resize).
  model_card.write_card(workdir, model_card.card_from_config(config, setup["model"]))
  manager = checkpoints.create_manager(workdir, keep=2, keep_best=0, async_save=False)
  zeros = jax.tree.map(np.zeros_like, setup["params"])
  checkpoints.save(manager, 1, {"params": zeros, "step": 1}, force=True)
  checkpoints.save(manager, 2, {"params": setup["params"], "step": 2}, force=True)
  manager.wait_until_finished()
  manager.close()
  listing = tmp_path / "videos.csv"
  (v0, f0), (v1, f1), _ = setup["videos"]
  listing.write_text("path,label\n" + "".join(f"{os.path.basename(v)},0\n" for v in (v0, v1)))
  for v in (v0, v1):
    os.symlink(v, tmp_path / os.path.basename(v))
  results = predict.run(resolve.artifact(resolve.UserConfig(), workdir=workdir), videos=[str(listing)])
  assert [os.path.basename(r["video"]) for r in results] == [os.path.basename(v) for v in (v0, v1)]
  for r, frames in zip(results, (f0, f1)):
    assert r["error"] is None and r["num_views"] == 1
    ref = _reference_probs(setup["model"], setup["params"], frames, 1, 1)
    np.testing.assert_allclose(r["probs"], ref, atol=2e-6)  # The latest step's params, not step 1's zeros.


def test_short_videos_warn_and_text_is_not_a_video(setup, tmp_path, caplog):
  short = tmp_path / "short.mkv"
  write_video(str(short), np.full((2, SIZE, SIZE, 3), 100, np.uint8))
  text = tmp_path / "notes.txt"
  text.write_text("hello\n" * 40)
  loaded = resolve.artifact(resolve.UserConfig(), checkpoint=setup["checkpoint"])
  with caplog.at_level("WARNING"):
    short_result, text_result = predict.predict_videos(loaded, [str(short), str(text)])
  assert short_result["error"] is None and "has 2 frames, fewer than the 4" in caplog.text
  assert "not a video" in text_result["error"]
