"""SIGTERM to a training process at start-up, while it compiles, mid-training and at a resumed start-up:
it exits promptly with ``EXIT_PREEMPTED``, says what it kept, and the checkpoint it names restores."""
import os
import re
import signal
import threading
import time

import numpy as np
from flax import traverse_util

from helpers import start_worker
from vfocal_jax import checkpoints
from vfocal_jax.preemption import EXIT_PREEMPTED

PROMPT_S = 60  # Generous: the measured exits take well under a few seconds (docs/training.md).


def _sigterm_at(workdir, marker, count=1, timeout=300, env=None):
  """Runs the worker's training loop, sends SIGTERM at the ``count``-th log line matching ``marker``.

  ``env``: more environment variables for the worker. Returns (exit status, log, seconds from the signal to
  the exit).
  """
  # One CPU device (the worker's flag).
  proc = start_worker(f"--workdir={workdir}", "--devices_per_process=1", "--steps=100000", "--log_every=2",
                      "--checkpoint_every=3", env=env)
  lines, seen, signalled = [], [0], []

  def read():
    for line in proc.stdout:
      lines.append(line)
      if not signalled and re.search(marker, line):
        seen[0] += 1
        if seen[0] == count:
          proc.send_signal(signal.SIGTERM)
          signalled.append(time.monotonic())

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  try:
    proc.wait(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
  reader.join(10)
  log = "".join(lines)
  assert signalled, f"never saw {marker!r}:\n{log[-3000:]}"
  return proc.returncode, log, time.monotonic() - signalled[0]


def _restores(workdir, step):
  params, restored = checkpoints.load_params_from_workdir(workdir)
  assert restored == step
  assert all(np.isfinite(np.asarray(v)).all() for v in traverse_util.flatten_dict(params).values())


def test_sigterm_at_every_moment_exits_promptly_and_keeps_the_checkpoint(tmp_path):
  ckpt = lambda w: os.path.join(w, "checkpoints")

  # Start-up (the model is built; restore and compiles come next): nothing to save.
  workdir = str(tmp_path / "startup")
  code, log, seconds = _sigterm_at(workdir, r"Mesh \{")
  assert code == EXIT_PREEMPTED and seconds < PROMPT_S, log[-3000:]
  assert f"SIGTERM during start-up: no checkpoint was written yet ({ckpt(workdir)} has none)" in log
  assert checkpoints.committed_steps(ckpt(workdir)) == []

  # The first step compiling: nothing trained yet, nothing to save. The signal goes when JAX starts compiling the
  # train step (its own log line, JAX_LOG_COMPILES); without the persistent cache that compile takes seconds, and
  # the log shows it never finished: the exit did not wait for it.
  workdir = str(tmp_path / "compile")
  code, log, seconds = _sigterm_at(workdir, r"Compiling jit\(train_step\)",
                                   env={"JAX_ENABLE_COMPILATION_CACHE": "false", "JAX_LOG_COMPILES": "1"})
  tail = "\n".join(line[:300] for line in log.splitlines()[-30:])   # JAX's compile lines are long
  assert code == EXIT_PREEMPTED and seconds < PROMPT_S, tail
  assert "Finished XLA compilation of jit(train_step)" not in log, tail
  assert "SIGTERM during the compilation of step 1: no checkpoint was written yet" in log, tail
  assert checkpoints.committed_steps(ckpt(workdir)) == []

  # Mid-training (checkpoints every 3 steps, a log line every 2): the step after the signal is saved.
  workdir = str(tmp_path / "training")
  code, log, seconds = _sigterm_at(workdir, r"step \d+/100000:", count=2)
  assert code == EXIT_PREEMPTED and seconds < PROMPT_S, log[-3000:]
  match = re.search(rf"Preempted at step (\d+): checkpoint step \1 committed in {re.escape(ckpt(workdir))}\.", log)
  assert match, log[-3000:]
  step = int(match.group(1))
  assert step >= 4 and checkpoints.committed_steps(ckpt(workdir))[-1] == step
  _restores(workdir, step)

  # The rerun's start-up: the checkpoint is named, and left as it was.
  code, log, seconds = _sigterm_at(workdir, r"Mesh \{")
  assert code == EXIT_PREEMPTED and seconds < PROMPT_S, log[-3000:]
  assert f"SIGTERM during start-up: the last checkpoint (step {step} in {ckpt(workdir)}) is intact" in log
  assert checkpoints.committed_steps(ckpt(workdir))[-1] == step
  _restores(workdir, step)
