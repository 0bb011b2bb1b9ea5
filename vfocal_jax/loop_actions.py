"""The periodic actions of the training loop: log a metrics window, evaluate, checkpoint.

Each is called after every step (``action(step, ...)``) and decides with one
plain predicate, ``itstime`` (big_vision's ``u.itstime``), whether this step
is one of its steps; clu's ``ReportProgress`` (steps/s, ETA, the share of time
spent in eval and checkpoints) runs beside them in ``train.py``.

* ``LogMetrics``: every ``log_every_steps`` and at the last step, the mean of
  the window of steps since the previous report (``metrics.MetricWindow``) to
  TensorBoard, the log and the run's history; a non-finite loss stops the run.
* ``PeriodicEval``: every ``eval_every_epochs`` (not at the last step: the
  final multi-view test follows), 1 clip x 1 crop; its top-1 goes with the
  checkpoint of that step (``keep_best_checkpoints``).
* ``Checkpointer``: every ``checkpoint_every_steps``, at evaluations, at the
  last step and on preemption; asynchronous; the window's partial sums travel
  in the checkpoint, so a resumed run logs the same windows as an
  uninterrupted one.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import jax
import ml_collections
from absl import logging
from clu import metric_writers

from vfocal_jax import checkpoints, errors, evaluate, paths
from vfocal_jax.metrics import MetricWindow
from vfocal_jax.preemption import EvalInterrupted, Preemption

CURVES_PNG = "training_curves.png"


class NonFiniteLossError(errors.UserError, RuntimeError):
  """The loss or the gradient norm became NaN/inf; the message names the last committed checkpoint.

  A user error (one line, exit 2): the fix is in the config (learning rate, dtype, clipping).
  """


def itstime(step: int, every_steps: int, total_steps: int, *, last: bool = True) -> bool:
  """Whether ``step`` is a multiple of ``every_steps`` (0: none is), or the last step when ``last``."""
  return (every_steps > 0 and step % every_steps == 0) or (last and step == total_steps)


class Checkpointer:
  """Saves the state, the input position and the metric window (asynchronously)."""

  def __init__(self, manager, *, every_steps: int, last_step: int, train_iter: Any, window: MetricWindow):
    self.manager, self.train_iter, self.window = manager, train_iter, window
    self.every_steps, self.last_step = int(every_steps), int(last_step)
    self.directory = str(manager.directory)
    self.in_flight: int | None = None  # The last step saved (its commit may still be running).

  def __call__(self, step: int, state: Any = None, *, metrics: dict[str, float] | None = None,
               force: bool = False) -> bool:
    """Saves at the periodic steps and the last one, and whenever ``force`` (evaluations, preemption)."""
    if force or itstime(step, self.every_steps, self.last_step):
      self.save(step, state, metrics=metrics)
      return True
    return False

  def save(self, step: int, state: Any, *, metrics: dict[str, float] | None = None) -> None:
    if self.window.non_finite():  # Never checkpoint past a skipped, non-finite update.
      raise NonFiniteLossError(non_finite_message(step, None, self.latest()))
    checkpoints.save(self.manager, step, state, self.train_iter, metrics=metrics, force=True,
                     loop_state={"window": self.window.state_dict()}, previous_step=self.in_flight)
    self.in_flight = step

  def wait(self) -> None:
    """Blocks until the last save has committed (``CheckpointWriteError`` if it failed)."""
    checkpoints.wait_until_finished(self.manager, self.in_flight)

  def check(self) -> None:
    """Raises ``CheckpointWriteError`` if a background commit already failed (does not wait)."""
    checkpoints.check_for_errors(self.manager, self.in_flight)

  def latest(self) -> str:
    """The last committed checkpoint, in words (waits for a save in flight; never raises)."""
    try:
      self.manager.wait_until_finished()
    except Exception:  # pylint: disable=broad-except  # That save is lost; describe what is on disk.
      pass
    return checkpoints.describe_latest(self.directory)


def non_finite_message(step: int, values: dict[str, float] | None, latest: str) -> str:
  detail = f" (loss={values['loss']:.4g}, grad_norm={values['grad_norm']:.4g})" if values else ""
  return (f"Non-finite loss or gradient at or before step {step}{detail}: the update was skipped and training "
          f"stopped; {latest}. Try a lower learning rate, float32 compute (--config.model.dtype=float32) or "
          "gradient clipping (--config.grad_clip_norm).")


class LogMetrics:
  """The window's means to TensorBoard, the log and ``history`` (``(step, loss)`` pairs)."""

  def __init__(self, config: ml_collections.ConfigDict, *, window: MetricWindow, writer: metric_writers.MetricWriter,
               checkpointer: Checkpointer, total_steps: int, steps_per_epoch: int):
    self.every_steps = int(config.log_every_steps)
    self.window, self.writer, self.checkpointer = window, writer, checkpointer
    self.total, self.steps_per_epoch = total_steps, steps_per_epoch
    self.clips_per_step = int(config.batch_size) * max(int(config.accumulation_steps), 1)
    self.history: list[tuple[int, float]] = []
    self.num_skipped = 0
    self._rate_from: tuple[int, float] | None = None

  def start_timing(self, step: int) -> None:
    """Measures clips/s from here (after the first step's compile)."""
    self._rate_from = (step, time.monotonic())

  def __call__(self, step: int) -> None:
    if not itstime(step, self.every_steps, self.total):
      return
    t = time.monotonic()
    num_steps = self.window.num_steps
    values = self.window.flush()
    if values is None:
      return
    if values["non_finite"] > 0:
      raise NonFiniteLossError(non_finite_message(step, values, self.checkpointer.latest()))
    self.checkpointer.check()  # A background save that failed stops the run now, not at the next save.
    from_step, from_t = self._rate_from or (step - num_steps, t)
    rate = (step - from_step) / max(t - from_t, 1e-9) if step > from_step else 0.0
    self._rate_from = (step, t)
    values.update(steps_per_sec=rate, clips_per_sec=rate * self.clips_per_step, num_skipped=self.num_skipped,
                  epoch=step / self.steps_per_epoch)
    self.writer.write_scalars(step, values)
    self.history.append((step, values["loss"]))
    logging.info("step %d/%d: loss %.4f top1 %.3f lr %.3g |g| %.3g %.1f clips/s skipped %d", step, self.total,
                 values["loss"], values["top1"], values["learning_rate"], values["grad_norm"],
                 values["clips_per_sec"], self.num_skipped)


class PeriodicEval:
  """1 clip x 1 crop on the eval split every ``eval_every`` steps (not at the last one: the final test follows)."""

  def __init__(self, config: ml_collections.ConfigDict, *, every_steps: int, total_steps: int, model, mesh,
               eval_step: Callable, writer: metric_writers.MetricWriter, preemption: Preemption):
    self.config, self.model, self.mesh, self.eval_step = config, model, mesh, eval_step
    self.writer, self.preemption = writer, preemption
    self.every_steps, self.total = int(every_steps or 0), int(total_steps)

  def __call__(self, step: int, state: Any) -> dict[str, float] | None:
    """The metrics to keep with this step's checkpoint, or None when no evaluation ran."""
    if not itstime(step, self.every_steps, self.total, last=False) or step == self.total:
      return None
    config = self.config
    try:
      batches = self.preemption.interruptible(
          evaluate.create_eval_iterator(config, config.eval_num_clips, config.eval_num_crops))
      res = evaluate.evaluate_params(config, self.model, state.params, self.mesh, num_clips=config.eval_num_clips,
                                     num_crops=config.eval_num_crops, step_fn=self.eval_step, batches=batches)
    except EvalInterrupted:
      logging.warning("Preempted during the evaluation at step %d: it is skipped.", step)
      return None
    self.writer.write_scalars(step, {f"eval/{k}": v for k, v in res.items() if isinstance(v, float)})
    return {"top1": res["top1"]}


def write_training_curves(workdir: str) -> None:
  """``workdir/training_curves.png`` from the run's TensorBoard events (process 0; never fails the run)."""
  if jax.process_index() != 0:
    return
  from vfocal_jax import plots
  try:
    logging.info("Wrote %s", plots.plot_training_curves(workdir, paths.join(workdir, CURVES_PNG)))
  except Exception as e:  # pylint: disable=broad-except  # A figure is never worth losing the run over.
    logging.warning("Could not draw the training curves: %s", e)


def fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}"
