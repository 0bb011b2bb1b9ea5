r"""How long `main.py train` takes to exit after SIGTERM, and whether its checkpoint survives.

    .venv/bin/python benchmarks/preemption_latency.py [--rows=start-up,compile,training,resumed,final-eval] \
        [--root=/tmp/preemption_latency] [--repo=.] [--markdown]

Each row starts `python main.py train` on the demo config (tiny overrides: an
8-channel model, 4 frames, batch 8, a 40-video demo set built once under
`--root`) as a subprocess, waits for a line of its log that marks a moment,
sends SIGTERM, and measures from the signal to

* committed: the log line saying the preemption checkpoint is committed
  (`checkpoint step N committed`; none when there was nothing new to save);
* exit: the process's exit, with its exit status (143 = preempted, rerun to resume).

Then the latest checkpoint of the workdir is restored in a fresh process
(`checkpoints.load_params_from_workdir`) and its step is shown.

Moments (the regex on the log that triggers the signal):

* start-up: `Mesh {...}` (the model is built; iterator, checkpoint manager and
  the first compile come next);
* compile: `compiling the train step` (the first step of the run is compiling);
* training: the second `step N/M` log line (a checkpoint has been written at step 20);
* resumed: the start-up of a second run in the `training` row's workdir (a checkpoint exists);
* final-eval: `Training done` (the last checkpoint is written; the final test runs).

The persistent compilation cache is off, as on a fresh VM: each run compiles.
Timings depend on the machine's load; the table in docs/training.md was
measured on the 2-core CPU container.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY = ["--config.num_frames=4", "--config.image_size=32", "--config.model.embed_dim=8",
        "--config.model.depths=(1,1,1,1)", "--config.batch_size=8", "--config.eval_batch_size=8",
        "--config.log_every_steps=10", "--config.checkpoint_every_steps=20", "--config.data.shuffle_buffer_size=16",
        "--config.data.num_threads=1"]
DEMO = dict(train_per_class=4, val_per_class=1, num_frames=8, height=32, width=40, num_train_shards=2,
            num_val_shards=1, workers=1)

# name -> (marker regex, how many matches to wait for, extra flags, workdir of another row to reuse)
ROWS = {
    "start-up": (r"Mesh \{", 1, ["--config.num_train_steps=100000"], None),
    "compile": (r"compiling the train step|\[Hyperparameters\]", 1, ["--config.num_train_steps=100000"], None),
    "training": (r"step \d+/\d+", 2, ["--config.num_train_steps=100000"], None),
    "resumed": (r"Mesh \{", 1, ["--config.num_train_steps=100000"], "training"),
    "final-eval": (r"Training done", 1, ["--config.num_train_steps=30"], None),
}
COMMITTED = re.compile(r"checkpoint step (\d+) committed|Preempted at step (\d+)")


def build_demo_data(directory: pathlib.Path) -> None:
  if (directory / "DONE").exists():
    return
  sys.path.insert(0, str(ROOT))
  from vfocal_jax.data import demo_dataset
  demo_dataset.build_demo_dataset(str(directory), **DEMO)
  (directory / "DONE").write_text("")


def run_row(name: str, *, repo: pathlib.Path, workdir: pathlib.Path, demo_dir: pathlib.Path,
            timeout: float = 900.0, delay: float = 0.0) -> dict:
  marker, count, extra, _ = ROWS[name]
  cmd = [sys.executable, str(repo / "main.py"), "train", f"--workdir={workdir}",
         f"--config.demo_data_dir={demo_dir}", *TINY, *extra]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  for key in ("JAX_COMPILATION_CACHE_DIR", "XLA_FLAGS"):
    env.pop(key, None)
  log = open(workdir.parent / f"{workdir.name}.{name}.log", "w")
  t0 = time.monotonic()
  proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1)
  row = {"moment": name, "signal_s": None, "committed_s": None, "exit_s": None, "code": None, "step": None}
  pattern, seen, signalled = re.compile(marker), 0, threading.Event()

  def read():
    nonlocal seen
    for line in proc.stdout:
      now = time.monotonic()
      log.write(f"{now - t0:8.2f} {line}")
      if not signalled.is_set() and pattern.search(line):
        seen += 1
        if seen >= count:
          time.sleep(delay)
          proc.send_signal(signal.SIGTERM)
          row["signal_s"] = time.monotonic() - t0
          signalled.set()
      elif signalled.is_set() and row["committed_s"] is None:
        m = COMMITTED.search(line)
        if m:
          row["committed_s"] = now - t0 - row["signal_s"]
          row["step"] = int(m.group(1) or m.group(2))

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  try:
    proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
  t_exit = time.monotonic() - t0
  reader.join(5)
  log.close()
  row["code"] = proc.returncode
  if row["signal_s"] is not None:
    row["exit_s"] = t_exit - row["signal_s"]
  row["restored_step"] = restored_step(repo, workdir)
  return row


def restored_step(repo: pathlib.Path, workdir: pathlib.Path) -> str:
  """The step of the latest checkpoint, restored in a fresh process ('none' when there is none)."""
  if not (workdir / "checkpoints").exists() or not any(p.name.isdigit() for p in (workdir / "checkpoints").iterdir()):
    return "none"
  code = ("import sys, numpy as np; from flax import traverse_util; from vfocal_jax import checkpoints; "
          "p, s = checkpoints.load_params_from_workdir(sys.argv[1]); "
          "assert all(np.isfinite(np.asarray(v)).all() for v in traverse_util.flatten_dict(p).values()); print(s)")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code, str(workdir)], cwd=repo, env=env, capture_output=True, text=True)
  return out.stdout.strip().splitlines()[-1] if out.returncode == 0 else f"FAILED: {out.stderr.strip()[-200:]}"


def fmt(value, spec=".1f") -> str:
  return "-" if value is None else format(value, spec)


def format_table(rows: list[dict]) -> str:
  lines = ["| SIGTERM during | signal at (s after launch) | checkpoint committed (s after signal) | "
           "exit (s after signal) | exit status | checkpoint restored |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    committed = fmt(r["committed_s"]) + (f" (step {r['step']})" if r["step"] is not None else "")
    lines.append(f"| {r['moment']} | {fmt(r['signal_s'])} | {committed} | {fmt(r['exit_s'])} | {r['code']} | "
                 f"{r['restored_step']} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", default=",".join(ROWS))
  parser.add_argument("--root", default="/tmp/preemption_latency")
  parser.add_argument("--repo", default=str(ROOT), help="checkout whose main.py runs (to compare versions)")
  parser.add_argument("--demo_data_dir", default="",
                      help="full-size demo shards (`main.py` builds them in <workdir>/demo_data): run the demo "
                           "config as it is (model, batch, pipeline) instead of the tiny overrides")
  parser.add_argument("--signal_delay", type=float, default=0.0, help="seconds from the marker to the signal")
  args = parser.parse_args(argv)
  root, repo = pathlib.Path(args.root), pathlib.Path(args.repo).resolve()
  root.mkdir(parents=True, exist_ok=True)
  if args.demo_data_dir:
    demo_dir = pathlib.Path(args.demo_data_dir).resolve()
    TINY[:] = ["--config.log_every_steps=10", "--config.checkpoint_every_steps=20"]
  else:
    demo_dir = root / "demo_data"
    build_demo_data(demo_dir)
  rows, workdirs = [], {}
  for name in args.rows.split(","):
    reuse = ROWS[name][3]
    workdir = workdirs.get(reuse) or root / f"run_{name}_{int(time.time())}"
    workdirs[name] = workdir
    row = run_row(name, repo=repo, workdir=workdir, demo_dir=demo_dir, delay=args.signal_delay)
    print(format_table([row]).splitlines()[-1], flush=True)
    rows.append(row)
  print(format_table(rows))
  return rows


if __name__ == "__main__":
  main()
