"""The loop: stop after a checkpoint (SIGTERM) and restart = uninterrupted; non-finite loss stops cleanly."""
import json
import os
import signal

import numpy as np
import pytest
from flax import traverse_util

from multihost_worker import StreamIterator, run_steps, tiny_config
from vfocal_jax import checkpoints, evaluate, train

models = pytest.importorskip("vfocal_jax.models")
if not hasattr(models, "create_model"):
  pytest.skip("vfocal_jax.models has no create_model yet", allow_module_level=True)


def _eval_batches(config, n=5):
  rng = np.random.default_rng(7)
  video = rng.normal(size=(8, 1, config.num_frames, config.image_size, config.image_size, 3)).astype(np.float32)
  return [{"video": video, "label": rng.integers(0, 5, 8).astype(np.int32), "mask": np.arange(8) < n}]


@pytest.fixture(autouse=True)
def _synthetic_eval(monkeypatch):
  monkeypatch.setattr(evaluate, "create_eval_iterator", lambda config, clips, crops: _eval_batches(config))
  monkeypatch.setattr(evaluate, "_class_names", lambda config: None)


class _SigtermAt(StreamIterator):
  """Sends SIGTERM to this process while fetching batch number ``at``."""

  def __init__(self, config, at):
    super().__init__(config)
    self.at = at

  def __next__(self):
    if self.pos == self.at:
      os.kill(os.getpid(), signal.SIGTERM)
    return super().__next__()


def test_restart_reproduces_uninterrupted_run(tmp_path):
  config = tiny_config(mesh_shape=(4, 2), num_train_steps=6, checkpoint_every_steps=2)
  expected_losses, expected_params = run_steps(config, 6)

  workdir = str(tmp_path / "run")
  first = train.train_and_evaluate(config, workdir, train_iter=_SigtermAt(config, at=3), steps_per_epoch=100)
  assert first["preempted_at"] == 4
  # A new process would build a fresh iterator at position 0; the checkpoint moves it.
  second = train.train_and_evaluate(config, workdir, train_iter=StreamIterator(config), steps_per_epoch=100)
  losses = dict(first["history"]) | dict(second["history"])
  assert sorted(losses) == [1, 2, 3, 4, 5, 6] and [s for s, _ in second["history"]] == [5, 6]
  np.testing.assert_allclose([losses[s] for s in range(1, 7)], expected_losses, rtol=1e-6)

  results = json.load(open(os.path.join(workdir, "eval_results.json")))
  assert results["num_videos"] == 5 and results["step"] == 6
  for png in (train.CURVES_PNG, evaluate.CONFUSION_PNG):  # Figures of the finished run.
    assert os.path.getsize(os.path.join(workdir, png)) > 1000, png
  assert json.load(open(os.path.join(workdir, "config.json")))["model"]["embed_dim"] == 8

  params, saved_config = checkpoints.load_params_from_workdir(workdir)
  assert saved_config.model.embed_dim == 8
  flat, ref = traverse_util.flatten_dict(params, sep="/"), traverse_util.flatten_dict(expected_params, sep="/")
  assert flat.keys() == ref.keys()
  for key in ref:
    np.testing.assert_allclose(np.asarray(flat[key]), ref[key], rtol=1e-5, atol=1e-6, err_msg=key)


class _NanAt(StreamIterator):
  def __init__(self, config, at):
    super().__init__(config)
    self.at = at

  def __next__(self):
    batch = super().__next__()
    if self.pos - 1 == self.at:
      batch["pixel_affine"] = batch["pixel_affine"] * np.nan
    return batch


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = tiny_config(mesh_shape=(8, 1), num_train_steps=6, checkpoint_every_steps=2, log_every_steps=100)
  workdir = str(tmp_path / "nan")
  with pytest.raises(train.NonFiniteLossError, match="last good checkpoint"):
    train.train_and_evaluate(config, workdir, train_iter=_NanAt(config, at=2), steps_per_epoch=100)
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps == [2]
  params, _ = checkpoints.load_params_from_workdir(workdir)
  assert all(np.isfinite(np.asarray(v)).all() for v in traverse_util.flatten_dict(params).values())
