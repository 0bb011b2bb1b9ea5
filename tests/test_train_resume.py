"""The loop: stop after a checkpoint (SIGTERM) and restart = uninterrupted, metrics windows included;
a non-finite loss stops with a message naming the checkpoint that is really there."""
import json
import os
import signal

import numpy as np
import pytest
from flax import traverse_util

from helpers import StreamIterator, run_steps, tiny_config
from vfocal_jax import checkpoints, errors, evaluate, train


pytestmark = pytest.mark.usefixtures("synthetic_eval")


class _SigtermAt(StreamIterator):
  """Sends SIGTERM to this process while fetching batch number ``at``."""

  def __init__(self, config, at):
    super().__init__(config)
    self.at = at

  def __next__(self):
    if self.pos == self.at:
      os.kill(os.getpid(), signal.SIGTERM)
    return super().__next__()


def _run(config, workdir, train_iter):
  return train.train_and_evaluate(config, workdir, train_iter=train_iter, steps_per_epoch=100,
                                  exit_on_preemption=False)


def test_restart_reproduces_uninterrupted_run(tmp_path):
  config = tiny_config(mesh_shape=(4, 2), num_train_steps=6, checkpoint_every_steps=2)
  expected_losses, expected_params = run_steps(config, 6)

  workdir = str(tmp_path / "run")
  first = _run(config, workdir, _SigtermAt(config, at=3))
  assert first["preempted_at"] == 4
  # A new process would build a fresh iterator at position 0; the checkpoint moves it.
  second = _run(config, workdir, StreamIterator(config))
  losses = dict(first["history"]) | dict(second["history"])
  assert sorted(losses) == [1, 2, 3, 4, 5, 6] and [s for s, _ in second["history"]] == [5, 6]
  np.testing.assert_allclose([losses[s] for s in range(1, 7)], expected_losses, rtol=1e-6)

  results = json.load(open(os.path.join(workdir, "eval_results.json")))
  assert results["num_videos"] == 5 and results["step"] == 6
  for png in (train.CURVES_PNG, evaluate.CONFUSION_PNG):  # Figures of the finished run.
    assert os.path.getsize(os.path.join(workdir, png)) > 1000, png
  assert json.load(open(os.path.join(workdir, "config.json")))["model"]["embed_dim"] == 8

  params, step = checkpoints.load_params_from_workdir(workdir)
  assert step == 6
  flat, ref = traverse_util.flatten_dict(params, sep="/"), traverse_util.flatten_dict(expected_params, sep="/")
  assert flat.keys() == ref.keys()
  for key in ref:
    np.testing.assert_allclose(np.asarray(flat[key]), ref[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_logged_windows_after_resume_equal_the_uninterrupted_run(tmp_path):
  # Windows end at step 5 and at the last step, 6. The run is preempted after step 3, inside the
  # first window, which also spans the checkpoints of steps 2 and 4. (The compiled programs are
  # those of the test above: log_every_steps is not part of them.)
  config = tiny_config(mesh_shape=(4, 2), num_train_steps=6, checkpoint_every_steps=2, log_every_steps=5)
  uninterrupted = _run(config, str(tmp_path / "straight"), StreamIterator(config))["history"]
  assert [s for s, _ in uninterrupted] == [5, 6]

  workdir = str(tmp_path / "resumed")
  first = _run(config, workdir, _SigtermAt(config, at=2))
  assert first["preempted_at"] == 3 and first["history"] == []  # The open window 1-3 is in the checkpoint.
  second = _run(config, workdir, StreamIterator(config))
  assert [s for s, _ in second["history"]] == [5, 6]
  np.testing.assert_allclose([v for _, v in second["history"]], [v for _, v in uninterrupted], rtol=1e-6)


class _NanAt(StreamIterator):
  def __init__(self, config, at):
    super().__init__(config)
    self.at = at

  def __next__(self):
    batch = super().__next__()
    if self.pos - 1 == self.at:
      batch["pixel_affine"] = batch["pixel_affine"] * np.nan
    return batch


def test_non_finite_loss_stops_and_names_the_last_checkpoint(tmp_path):
  config = tiny_config(mesh_shape=(4, 2), num_train_steps=6, checkpoint_every_steps=2, log_every_steps=100)
  workdir = str(tmp_path / "nan")
  with pytest.raises(train.NonFiniteLossError) as e:
    _run(config, workdir, _NanAt(config, at=2))
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert f"the last checkpoint (step 2 in {ckpt_dir}) is intact" in str(e.value)
  assert isinstance(e.value, errors.UserError) and "\n" not in str(e.value)  # One line on the command line.
  steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  assert steps == [2]
  params, step = checkpoints.load_params_from_workdir(workdir)
  assert step == 2
  assert all(np.isfinite(np.asarray(v)).all() for v in traverse_util.flatten_dict(params).values())


def test_non_finite_loss_before_any_checkpoint_says_so(tmp_path):
  config = tiny_config(mesh_shape=(4, 2), num_train_steps=6, checkpoint_every_steps=100, log_every_steps=2)
  workdir = str(tmp_path / "nan0")
  with pytest.raises(train.NonFiniteLossError, match=r"no checkpoint was written yet") as e:
    _run(config, workdir, _NanAt(config, at=0))
  assert "step 0" not in str(e.value) and "at or before step 2" in str(e.value)
  assert not [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
