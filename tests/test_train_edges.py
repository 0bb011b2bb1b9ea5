"""Bad input to the loop, and the one line a user reads: a full disk during a save, bad training fields."""
import errno
import os
import subprocess
import sys

import numpy as np
import pytest
from etils import epath
from flax import traverse_util

from helpers import ROOT, StreamIterator, tiny_config, use_synthetic_eval
from vfocal_jax import checkpoints, train, train_config

pytestmark = pytest.mark.usefixtures("synthetic_eval")


def _enospc(path):
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _full_disk_from_step(monkeypatch, step):
  """Every file Orbax writes for checkpoint ``step`` or later fails as on a full disk (ENOSPC)."""
  original = epath.Path.write_text

  def write_text(self, *args, **kwargs):
    name = next((p for p in reversed(self.parts) if p.split(".")[0].isdigit()), "")
    if "checkpoints" in self.parts and name and int(name.split(".")[0]) >= step:
      raise _enospc(self)
    return original(self, *args, **kwargs)

  monkeypatch.setattr(epath.Path, "write_text", write_text)


class _FullDiskIterator(StreamIterator):
  """Its position file (written synchronously inside the save) fails with ENOSPC from position ``at``."""

  def __init__(self, config, at):
    super().__init__(config)
    self.at = at

  def save(self, path):
    if self.pos >= self.at:
      raise _enospc(path)
    super().save(path)


def _params_finite(params):
  return all(np.isfinite(np.asarray(v)).all() for v in traverse_util.flatten_dict(params).values())


@pytest.mark.parametrize("where", ["background commit", "synchronous save"])
def test_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, caplog, where):
  config = tiny_config(mesh_shape=(4, 2), num_train_steps=6, checkpoint_every_steps=2, async_checkpointing=True)
  workdir = str(tmp_path / "run")
  it = StreamIterator(config)
  if where == "background commit":
    _full_disk_from_step(monkeypatch, 4)
  else:
    it = _FullDiskIterator(config, at=4)
  with pytest.raises(checkpoints.CheckpointWriteError) as e:
    train.train_and_evaluate(config, workdir, train_iter=it, steps_per_epoch=100, exit_on_preemption=False)
  message = str(e.value)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert isinstance(e.value, OSError) and "\n" not in message  # The command line prints it as one line.
  assert message.startswith(f"could not write checkpoint step 4 in {ckpt_dir}: ")
  assert "No space left on device" in message and e.value.errno == errno.ENOSPC
  assert f"the last checkpoint (step 2 in {ckpt_dir}) is intact" in message and "free space" in message
  # Orbax's own thread tracebacks are not printed (the cause is chained to the error, for --traceback).
  assert not [r for r in caplog.records if r.exc_info and "orbax" in r.pathname]

  monkeypatch.undo()
  use_synthetic_eval(monkeypatch.setattr)
  params, step = checkpoints.load_params_from_workdir(workdir)
  assert step == 2 and _params_finite(params)
  # Space freed: the rerun resumes from step 2 (the failed save's leftovers are cleaned up) and finishes.
  rerun = train.train_and_evaluate(config, workdir, train_iter=StreamIterator(config), steps_per_epoch=100,
                                   exit_on_preemption=False)
  assert [s for s, _ in rerun["history"]] == [3, 4, 5, 6] and rerun["step"] == 6


@pytest.mark.parametrize("overrides, expected", [
    (dict(batch_size=6, mesh_shape=(4, 2)), "--config.batch_size=6: must divide by the 4 devices of the mesh's "
                                            "'data' axis (mesh_shape (4, 2) on 8 devices)"),
    (dict(log_every_steps=0), "--config.log_every_steps=0: must be at least 1"),
    (dict(checkpoint_every_steps=-5, keep_checkpoints=0), "--config.checkpoint_every_steps=-5: must be at least 1; "
                                                          "--config.keep_checkpoints=0: must be at least 1"),
    (dict(mesh_shape=(3, -1)), "--config.mesh_shape=3,-1: mesh_shape (3, -1) does not divide 8 devices"),
    (dict(eval_batch_size=12), "--config.eval_batch_size=12: must divide by the 8 devices"),
    (dict(num_train_steps=0), "--config.num_train_steps=0: must be > 0, or -1"),
    (dict(optimizer="adam"), "--config.optimizer=adam: expected one of sgd, adamw"),
])
def test_bad_training_fields_are_named_before_anything_is_written(tmp_path, overrides, expected):
  config = tiny_config(**overrides)
  workdir = tmp_path / "run"
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(config, str(workdir), train_iter=StreamIterator(config), steps_per_epoch=100,
                             exit_on_preemption=False)
  assert expected in str(e.value) and "\n" not in str(e.value)
  assert not workdir.exists()


def test_validate_counts_processes():
  config = tiny_config(batch_size=6, eval_batch_size=9, mesh_shape=(1, -1))
  with pytest.raises(ValueError, match=r"--config.batch_size=6: batch_size x accumulation_steps must divide by the "
                                       r"4 processes; --config.eval_batch_size=9: must divide by the 4 processes"):
    train_config.validate(config, num_devices=8, num_processes=4)
  train_config.validate(tiny_config(batch_size=6, accumulation_steps=2, mesh_shape=(1, -1)), num_devices=8,
                        num_processes=4)


def test_command_line_prints_the_bad_fields_as_one_line(tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "main.py", "train", "--config=k400_tiny", f"--workdir={workdir}",
                        "--config.batch_size=30", "--config.log_every_steps=0"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert errors == ["error: --config.log_every_steps=0: must be at least 1; --config.batch_size=30: must divide by "
                    "the 8 devices of the mesh's 'data' axis (mesh_shape (-1, 1) on 8 devices); it is the global "
                    "batch of one micro-step  (--traceback shows where)"]
  assert not workdir.exists()
