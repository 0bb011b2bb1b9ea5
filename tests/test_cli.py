"""The command line's contract: each command its own flags, user errors as one line (exit 2), bugs as tracebacks (exit 1)."""
import os
import pathlib
import subprocess
import sys

import pytest

from vfocal_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")


def _run(*args, code=None, timeout=180):
  command = [sys.executable, "-c", code, *args] if code else [sys.executable, *args]
  return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def _errors(proc):
  return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("argv,words", [
    (["train", "--topology=v5e:2x2"], "--topology is a flag of plan, not of train"),
    (["summary", "--workdir=/tmp/x"], "--workdir is a flag of train, eval, convert, predict, visualize, export, "
                                      "not of summary"),
    (["make_shards", "--config.batch_size=3"], "--config is a flag of train, eval, convert, summary, predict, "
                                              "visualize, plan, export, not of make_shards"),
])
def test_a_flag_of_another_command_is_one_line(argv, words):
  proc = _run("main.py", *argv)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(_errors(proc)) == 1 and words in _errors(proc)[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


def test_make_shards_is_a_command_and_keeps_its_module_form(tmp_path):
  for argv in (["main.py", "make_shards"], ["-m", "vfocal_jax.data.make_shards"]):
    proc = _run(*argv, f"--output_dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert _errors(proc) == ["error: --csv is required: the `path,label` list of videos  (--traceback shows where)"]


# A bug planted where a command runs: the summary's MAC count raises.
PLANTED = """
import sys
from vfocal_jax import cli, summary
def broken(*args, **kwargs):
  raise {kind}("planted bug")
summary.count_macs = broken
cli.run(["vfocal", "summary", "--config=k400_tiny"])
"""


@pytest.mark.parametrize("kind", ["ValueError", "KeyError"])
def test_an_internal_error_prints_its_traceback_and_exits_1(kind):
  proc = _run(code=PLANTED.format(kind=kind))
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "Traceback (most recent call last)" in proc.stderr and f"{kind}: " in proc.stderr
  assert "planted bug" in proc.stderr and "in broken" in proc.stderr
  assert not _errors(proc)


def test_every_flag_belongs_to_a_command():
  declared = set().union(*cli.COMMAND_FLAGS.values())
  ours = {flag.name for flag in cli.FLAGS.get_flags_for_module(cli.__name__)}
  assert ours - declared == {"traceback"}  # Every command takes --traceback.
  assert declared - ours == {"config"}  # Defined by ml_collections' config_flags when the command line is parsed.
  assert all(cli.COMMAND_FLAGS[command] for command in cli.COMMANDS)
