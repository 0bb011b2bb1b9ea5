"""Periodic evaluation in the real loop: when it runs, what it writes, the best checkpoint it keeps, and a
SIGTERM that arrives during it (docs/training.md: the evaluation stops at its next batch and is skipped, the
loop saves after the current step and returns ``preempted_at``)."""
import os
import signal
import time

import numpy as np
import pytest

from helpers import StreamIterator, synthetic_eval_batches, tiny_config
from vfocal_jax import checkpoints, evaluate, plots, train

STEPS_PER_EPOCH = 4


pytestmark = pytest.mark.usefixtures("synthetic_eval")


def _config(**overrides):
  # A two-stage model on two frames, data-parallel (the cheapest compiles). Evaluations every half epoch =
  # 2 steps: at steps 2 and 4, not at the last step (the final test follows). Checkpoints only at evaluations
  # and at the end.
  return tiny_config(mesh_shape=(8, 1), num_frames=2, num_train_steps=6, eval_every_epochs=0.5,
                     checkpoint_every_steps=1000, keep_checkpoints=1, keep_best_checkpoints=1,
                     **{"model.depths": (1, 1), "model.focal_levels": (1, 1)}, **overrides)


def _run(config, workdir):
  return train.train_and_evaluate(config, workdir, train_iter=StreamIterator(config), steps_per_epoch=STEPS_PER_EPOCH,
                                  exit_on_preemption=False)


def test_periodic_eval_writes_its_metrics_and_the_best_checkpoint_is_kept(tmp_path, monkeypatch):
  # Each evaluation runs for real; its top-1 is then replaced by a known value (the synthetic eval batch has
  # 5 videos, so real values tie often): step 2 scores best, step 4 worse.
  scripted = {2: 80.0, 4: 40.0}
  real_evaluate, calls = evaluate.evaluate_params, []

  def evaluate_params(*args, **kwargs):
    res = real_evaluate(*args, **kwargs)
    calls.append(dict(res))
    if len(calls) <= len(scripted):
      res["top1"] = list(scripted.values())[len(calls) - 1]
    return res

  monkeypatch.setattr(evaluate, "evaluate_params", evaluate_params)
  workdir = str(tmp_path / "run")
  result = _run(_config(), workdir)
  assert result["step"] == 6 and len(calls) == 3  # Two periodic evaluations and the final test.

  scalars = plots.read_scalars(workdir)
  steps, top1 = scalars["eval/top1"]
  assert list(steps) == [2, 4] and list(top1) == [80.0, 40.0]
  for name in ("top5", "mean_class_top1"):
    np.testing.assert_allclose(scalars[f"eval/{name}"][1], [c[name] for c in calls[:2]], err_msg=name)
  assert calls[0]["num_videos"] == 5
  # The latest (keep_checkpoints=1) and the best by eval top-1 (keep_best_checkpoints=1).
  assert checkpoints.committed_steps(os.path.join(workdir, "checkpoints")) == [2, 6]


class _Recorded(train.Preemption):
  instances = []

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    _Recorded.instances.append(self)


def test_sigterm_during_a_periodic_eval_skips_it_and_saves(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(train, "Preemption", _Recorded)
  config = _config()

  def eval_batches(config, clips, crops):
    """The first periodic evaluation's batches: SIGTERM before the first one is handed out."""
    if not calls:
      os.kill(os.getpid(), signal.SIGTERM)
      deadline = time.monotonic() + 60
      while not _Recorded.instances[-1].requested and time.monotonic() < deadline:
        time.sleep(0.01)  # The watcher thread raises the flag.
    calls.append(1)
    yield from synthetic_eval_batches(config) * 2

  calls = []
  monkeypatch.setattr(evaluate, "create_eval_iterator", eval_batches)
  workdir = str(tmp_path / "run")
  result = _run(config, workdir)
  # Signalled during the evaluation after step 2: it is skipped, and step 2 is saved (docs/training.md: "the
  # loop saves after the current step"), not trained past.
  assert result["preempted_at"] == 2 and "step" not in result
  assert "Preempted during the evaluation at step 2: it is skipped." in caplog.text
  assert "eval/top1" not in plots.read_scalars(workdir)
  assert checkpoints.committed_steps(os.path.join(workdir, "checkpoints")) == [2]
  assert checkpoints.load_params_from_workdir(workdir)[1] == 2
