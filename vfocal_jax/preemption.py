"""SIGTERM during training: save, commit, exit with ``EXIT_PREEMPTED`` within seconds.

A preempted TPU VM gets about 30 s between SIGTERM and the power-off. What
the loop does with it depends on whether anything would be lost:

* **Nothing since the last committed checkpoint is only in memory** (start-up,
  restoring, compiling the first step, the final test after the last
  checkpoint has committed): the process exits at once. Python runs signal
  handlers only between bytecodes of the main thread, so a handler would wait
  for a compile (minutes); instead the C-level handler's wake-up byte
  (``signal.set_wakeup_fd``) wakes a watcher thread, which exits the process.
* **Steps since the last checkpoint are only in memory**: the watcher raises a
  flag; the loop sees it after the current step, saves, waits for the commit
  and exits (an evaluation in progress is abandoned at its next batch).

The exit is ``os._exit(EXIT_PREEMPTED)`` once the checkpoint has committed and
the writers are flushed: the interpreter's teardown (input-pipeline threads,
XLA and TensorFlow runtimes) took 25-35 s and guards nothing. Library callers
(tests) pass ``exit_process=False`` to get control back instead.

Multi-process runs leave SIGTERM to JAX's preemption notifier:
``multihost_utils.reached_preemption_sync_point(step)`` makes every process
stop after the same step.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import jax
from absl import logging

# 128 + SIGTERM, what a shell reports for a process ended by SIGTERM: "preempted; whatever
# checkpoint exists is committed; rerun the same command to resume".
EXIT_PREEMPTED = 128 + signal.SIGTERM


class EvalInterrupted(Exception):
  """An evaluation stopped early because the run was preempted."""


class Preemption:
  """The run's SIGTERM state: a flag for the loop, or an immediate exit while nothing is at stake.

  Args:
    exit_process: end the process (``os._exit(EXIT_PREEMPTED)``) when
      preempted; False leaves that to the caller (in-process use, tests).
  """

  def __init__(self, *, exit_process: bool = True):
    self.exit_process = exit_process
    self.requested = False
    self._lock = threading.Lock()
    self._idle_note: str | None = "start-up: no step trained yet, nothing to lose"
    self._previous_handler = None
    self._previous_wakeup_fd = None
    self._write_fd = None
    self._multiprocess = jax.process_count() > 1
    if not self._multiprocess and threading.current_thread() is threading.main_thread():
      self._install()

  # --- Signal plumbing. ----------------------------------------------------------------------

  def _install(self) -> None:
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    self._previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    self._previous_wakeup_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    self._write_fd = write_fd
    threading.Thread(target=self._watch, args=(read_fd,), name="preemption_watcher", daemon=True).start()

  def _watch(self, read_fd: int) -> None:
    try:
      while True:
        data = os.read(read_fd, 64)
        if not data:  # close() closed the write end.
          return
        if signal.SIGTERM in data:
          self._on_sigterm()
    finally:
      os.close(read_fd)

  def _on_sigterm(self) -> None:
    with self._lock:  # Held through the exit: the loop cannot start a step meanwhile (busy() waits).
      first = not self.requested
      self.requested = True
      if self._idle_note is not None and self.exit_process:
        self._exit(f"SIGTERM during {self._idle_note}.")
    if first:
      logging.warning("SIGTERM: saving a checkpoint after this step, then exiting with status %d.",
                      EXIT_PREEMPTED)

  def close(self) -> None:
    """Puts back the previous SIGTERM handler and wake-up fd; stops the watcher."""
    if self._write_fd is None:
      return
    signal.set_wakeup_fd(self._previous_wakeup_fd)
    signal.signal(signal.SIGTERM, self._previous_handler)
    os.close(self._write_fd)
    self._write_fd = None

  # --- What the loop tells us, and asks. -------------------------------------------------------

  def idle(self, note: str) -> None:
    """From now on nothing would be lost: a SIGTERM exits at once, logging ``note``.

    If a SIGTERM came while busy, this exits now (``exit_process``).
    """
    with self._lock:
      self._idle_note = note
      if self.requested and self.exit_process:
        self._exit(f"SIGTERM during {note}.")

  def busy(self) -> None:
    """Progress not yet in a checkpoint exists: a SIGTERM now asks the loop to save first."""
    if self._idle_note is not None:
      with self._lock:
        self._idle_note = None

  def reached(self, step: int) -> bool:
    """Whether to save and stop after ``step`` (the same step on every process)."""
    if self._multiprocess:
      from jax.experimental import multihost_utils
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except Exception:  # No preemption service (not initialised by jax.distributed).
        return False
    return self.requested

  def interruptible(self, batches: Iterable[Any]) -> Iterator[Any]:
    """``batches``, stopping with ``EvalInterrupted`` once preempted (single process: the
    processes of a multi-process run could not agree on the batch)."""
    for batch in batches:
      if self.requested and not self._multiprocess:
        raise EvalInterrupted("preempted during evaluation")
      yield batch

  def finish(self, message: str) -> None:
    """Logs ``message`` and ends the process with ``EXIT_PREEMPTED`` (returns when not ``exit_process``).

    Call it once the checkpoint has committed and the writers are flushed.
    """
    if self.exit_process:
      with self._lock:
        self._exit(message)
    logging.warning("%s", message)

  def _exit(self, message: str) -> None:
    logging.warning("%s Exiting with status %d (preempted: rerun the same command to resume).",
                    message, EXIT_PREEMPTED)
    logging.flush()
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except (OSError, ValueError):
        pass
    os._exit(EXIT_PREEMPTED)
