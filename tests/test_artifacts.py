"""Artifacts describe themselves: a `.pth` converted with its card predicts right with no other flag.

The reference is independent of the library: the official-layout PyTorch model
(`benchmarks/torch_video_focalnet.py`) run on views cut in NumPy from frames
the test wrote losslessly (FFV1), with the segment-sampling formula of the
released test sampler and the ImageNet mean/std written out here.
"""
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util

from benchmarks import torch_video_focalnet as tvf  # The repository root is on sys.path (conftest).
from helpers import (NUM_CLASSES, ROOT, TINY_MODEL, StreamIterator, save_random_checkpoint, tiny_config,
                     tiny_model_config)
from reference_views import eval_views, write_video
from vfocal_jax import artifacts, checkpoints, evaluate, model_card, params_io, predict, resolve, train
from vfocal_jax.configs import default, demo
from vfocal_jax.convert import cli

FRAMES, SIZE, CLIPS, CROPS, INTERVAL = 4, 32, 2, 3, 4  # The tiny model's clip (helpers.tiny_model_config).
ARCH = dict(TINY_MODEL, num_classes=NUM_CLASSES)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  """A `.pth` in the released layout, converted with a recipe's clip and views, and a known video."""
  root = tmp_path_factory.mktemp("artifacts")
  torch.manual_seed(0)
  tmodel = tvf.randomize_(tvf.VideoFocalNet(num_frames=FRAMES, **ARCH), seed=0).eval()
  torch.save({"model": tmodel.state_dict(), "epoch": 3}, root / "released.pth")
  config = tiny_model_config(clips=CLIPS, crops=CROPS)
  labels = root / "labels.txt"
  labels.write_text("".join(f"class_{c}\n" for c in "abcde"))
  converted = cli.run(config=config, pth=str(root / "released.pth"), output_dir=str(root / "converted"),
                      labels=str(labels), check_model=True)
  frames = np.random.default_rng(1).integers(0, 256, (11, SIZE, 48, 3)).astype(np.uint8)
  write_video(str(root / "clip.mkv"), frames)
  with torch.no_grad():
    views = eval_views(frames, num_frames=FRAMES, size=SIZE, clips=CLIPS, crops=CROPS, interval=INTERVAL)
    views = torch.from_numpy(views.transpose(0, 1, 4, 2, 3).astype(np.float32))
    probs = torch.softmax(tmodel(views).double(), -1).mean(0).numpy()
  return dict(root=root, converted=converted, video=str(root / "clip.mkv"), probs=probs, tmodel=tmodel)


def test_card_records_model_clip_views_classes_and_provenance(released):
  card = model_card.read_card(released["converted"])
  assert card.fields["num_frames"] == FRAMES and card.fields["image_size"] == SIZE
  assert (card.fields["test_num_clips"], card.fields["test_num_crops"]) == (CLIPS, CROPS)
  assert card.fields["model.embed_dim"] == 8 and card.fields["model.depths"] == (1, 1, 1, 1)
  assert card.class_names == [f"class_{c}" for c in "abcde"]
  assert card.provenance["kind"] == "converted" and len(card.provenance["sha256"]) == 64


def test_predict_with_only_checkpoint_and_video_matches_torch(released, tmp_path):
  """What `main.py predict --checkpoint=DIR --video=a.mkv` does: the demo config, not chosen by the user."""
  results = predict.run(resolve.artifact(resolve.UserConfig(demo.get_config()), checkpoint=released["converted"]),
                        videos=released["video"])
  (r,) = results
  assert r["error"] is None and r["num_views"] == CLIPS * CROPS
  np.testing.assert_allclose(r["probs"], released["probs"], atol=2e-6)
  assert r["top"][0][1] == f"class_{'abcde'[int(np.argmax(released['probs']))]}"


def test_command_line_predict_and_its_exit_status(released, tmp_path):
  text = tmp_path / "notes.txt"
  text.write_text("not a video\n" * 50)
  out_csv = tmp_path / "out.csv"
  run = subprocess.run([sys.executable, "main.py", "predict", f"--checkpoint={released['converted']}",
                        f"--video={released['video']},{text}", f"--output_csv={out_csv}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == predict.EXIT_STATUS_FAILED, run.stderr[-2000:]
  assert "1 of 2 videos predicted" in run.stdout and "not a video" in run.stdout
  assert "Traceback" not in run.stderr
  row = out_csv.read_text().splitlines()[1].split(",")
  best = int(np.argmax(released["probs"]))
  assert row[2:5] == [f"class_{'abcde'[best]}", str(best), f"{released['probs'][best]:.6f}"]


def test_a_config_that_disagrees_with_the_card_is_an_error_unless_overridden(released):
  config = tiny_model_config(num_frames=8)  # The card's model at 32 px, but 8 frames and 1 x 1 views.
  with pytest.raises(model_card.CardMismatchError, match="num_frames: the config says 8, the model card says 4"
                     ) as info:
    resolve.artifact(resolve.UserConfig(config, given=True), checkpoint=released["converted"])
  assert "test_num_clips" in str(info.value) and "--config.num_frames" in str(info.value)
  assert "embed_dim" not in str(info.value)
  config.num_frames = FRAMES
  user = resolve.UserConfig(config, given=True, overrides=frozenset({"test_num_clips", "test_num_crops"}))
  loaded = resolve.artifact(user, checkpoint=released["converted"])
  assert (loaded.config.test_num_clips, loaded.config.num_frames) == (1, FRAMES)


def test_params_of_another_architecture_name_expected_and_found(released):
  config = demo.get_config()
  config.model.embed_dim = 16
  with pytest.raises(artifacts.ParamsMismatchError, match=r"head/kernel: expected \(128, 5\), found \(64, 5\)"):
    resolve.artifact(resolve.UserConfig(config, overrides=frozenset({"model.embed_dim"})),
                     checkpoint=released["converted"])


def _fake_state_dict(embed_dim, depths):
  sd = {"patch_embed.proj.weight": torch.zeros(embed_dim, 3, 4, 4), "head.weight": torch.zeros(400, 8)}
  for i, d in enumerate(depths):
    for j in range(d):
      sd[f"layers.{i}.blocks.{j}.norm1.weight"] = torch.zeros(1)
  return sd


def test_convert_with_a_wrong_variant_names_the_right_one(tmp_path):
  torch.save({"model": _fake_state_dict(128, (2, 2, 18, 2))}, tmp_path / "base.pth")
  with pytest.raises(cli.VariantMismatchError, match="Video-FocalNet-base.*--variant=base"):
    cli.run(config=default.get_config(), pth=str(tmp_path / "base.pth"), output_dir=str(tmp_path / "o"),
            variant="tiny")
  assert not (tmp_path / "o").exists()


def test_fine_tuning_takes_the_class_count_from_the_data_and_reinitialises_the_head(tmp_path, caplog,
                                                                                      monkeypatch):
  _, params, ckpt = save_random_checkpoint(tmp_path / "ck", tiny_config(**{"model.num_classes": 10}))
  shards = tmp_path / "shards"
  shards.mkdir()
  (shards / "train-00000.tfrecord").write_bytes(b"")
  (shards / "labels.txt").write_text("run\njump\nswim\n")
  config = tiny_config(num_train_steps=1, base_lr=0.0, warmup_lr=0.0, min_lr=0.0)
  config.data.train_shards = str(shards)
  monkeypatch.setattr(evaluate, "create_eval_iterator", lambda *a: [])

  class ThreeClasses(StreamIterator):
    def __next__(self):
      batch = super().__next__()
      return dict(batch, label=batch["label"] % 3)

  workdir = str(tmp_path / "run")
  # The absl logger's own level: a test that parsed absl flags earlier in this process may have set it to WARNING.
  with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger="absl"):
    train.train_and_evaluate(config, workdir, checkpoint=ckpt, train_iter=ThreeClasses(config), steps_per_epoch=10)
  log = caplog.text
  assert "label map has 3 classes" in log and "re-initialised" in log and "head/kernel" in log
  tuned, _ = checkpoints.load_params_from_workdir(workdir)
  assert tuned["head"]["kernel"].shape[-1] == 3
  flat, ref = traverse_util.flatten_dict(tuned, sep="/"), traverse_util.flatten_dict(params, sep="/")
  for key, value in flat.items():
    if not key.startswith("head/"):
      np.testing.assert_array_equal(value, ref[key], err_msg=key)  # lr 0: the checkpoint's weights.
  card = model_card.read_card(workdir)
  assert card.num_classes == 3 and card.class_names == ["run", "jump", "swim"]
  assert card.provenance["init_checkpoint"] == ckpt


def test_fine_tuning_a_checkpoint_of_another_width_is_an_error(tmp_path):
  _, _, ckpt = save_random_checkpoint(tmp_path / "ck", tiny_config())
  config = tiny_config(**{"model.embed_dim": 16})
  with pytest.raises(model_card.CardMismatchError, match="model.embed_dim: the config says 16"):
    train.train_and_evaluate(config, str(tmp_path / "run"), checkpoint=ckpt, train_iter=StreamIterator(config),
                             steps_per_epoch=10)
  assert not os.path.exists(tmp_path / "run" / "config.json")


def test_params_io_round_trip_with_card(tmp_path):
  config = tiny_config()
  model = artifacts.build_model(config)
  params = jax.tree.map(np.asarray, artifacts.init_params(model, jax.random.key(3), 4, 32))
  params["head"]["bias"] = params["head"]["bias"].astype(np.float64) + 0.25
  card = model_card.card_from_config(config, model, provenance={"kind": "test"})
  path = params_io.save_params(tmp_path / "ck", params, card)
  with pytest.raises(FileExistsError):
    params_io.save_params(tmp_path / "ck", params, card)
  with pytest.raises(FileNotFoundError, match="main.py convert"):
    params_io.load_params(tmp_path / "nothing")
  back = params_io.load_params(path)
  for key, value in traverse_util.flatten_dict(params, sep="/").items():
    got = traverse_util.flatten_dict(back, sep="/")[key]
    assert got.dtype == value.dtype
    np.testing.assert_array_equal(got, value)
  assert model_card.read_card(path).to_json() == card.to_json()
