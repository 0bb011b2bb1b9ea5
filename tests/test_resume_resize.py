"""Resuming on another number of processes (a slice of another size).

A 2-process run (2 x 4 devices, mesh (4, 2)) is checkpointed, resumed by 1
process (4 devices, mesh (2, 2)) that trains on and is checkpointed in turn,
then resumed by 2 processes again. The train state comes back exactly
(params equal to the checkpoint's, read independently on one device); the
input position by the documented rule: the examples consumed in the current
epoch, shared out over the new hosts, are skipped from the start of each
host's re-split files. Videos are labelled by their id, so the labels of a
batch say which videos it holds; the reference is a fresh iterator of the
same host (the stream the rule skips into).
"""
import functools
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from absl import logging as absl_logging
from flax import traverse_util

from helpers import GLOBAL_BATCH, free_port, shards_config, start_worker
from vfocal_jax import checkpoints, train
from vfocal_jax import input_pipeline as ip
from vfocal_jax.input_pipeline import shard_format
from vfocal_jax.input_pipeline.iterators import records_to_skip

NUM_FILES, PER_FILE = 4, 4
NUM_IDS = NUM_FILES * PER_FILE  # Video i has label i: an epoch is 16 examples, two global batches.


def _write_id_shards(directory):
  """4 files of 4 records; record i (file i // 4) has label i and 4 random 32x32 frames."""
  os.makedirs(directory)
  rng = np.random.default_rng(0)
  counts = {}
  for f in range(NUM_FILES):
    name = f"train-{f:05d}-of-{NUM_FILES:05d}.tfrecord"
    with tf.io.TFRecordWriter(os.path.join(directory, name)) as writer:
      for i in range(f * PER_FILE, (f + 1) * PER_FILE):
        frames = [tf.io.encode_jpeg(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).numpy() for _ in range(4)]
        writer.write(shard_format.make_sequence_example(frames, i).SerializeToString())
    counts[name] = PER_FILE
  with open(os.path.join(directory, shard_format.INFO_FILENAME), "w") as f:
    json.dump({"num_examples": NUM_IDS, "num_classes": NUM_IDS, "shards": counts}, f)


def _config(shards, **overrides):
  return shards_config(shards, NUM_IDS, **overrides)


@functools.lru_cache(maxsize=None)
def _fresh_stream(shards, process_index, process_count):
  """The first 32 labels host ``process_index`` of ``process_count`` reads when starting afresh."""
  config = _config(shards)
  it = ip.create_train_iterator(config.data, batch_size=GLOBAL_BATCH // process_count, seed=config.seed,
                                num_frames=config.num_frames, image_size=config.image_size,
                                process_index=process_index, process_count=process_count)
  labels = []
  while len(labels) < 32:
    labels.extend(int(x) for x in next(it)["label"])
  return labels


def _fresh_labels(shards, process_index, process_count, n):
  return _fresh_stream(shards, process_index, process_count)[:n]


def _run_phase(tmp, name, num_processes, devices, mesh, extra):
  """One run of the worker on ``num_processes`` processes; returns (per-process outputs, logs)."""
  port = free_port()
  procs = [start_worker(f"--workdir={tmp / 'run'}", f"--shards={tmp / 'ids'}", f"--num_classes={NUM_IDS}",
                        f"--out={tmp / name}_{{process}}", f"--num_processes={num_processes}", f"--process_id={i}",
                        f"--port={port}", f"--devices_per_process={devices}", f"--mesh={mesh}", *extra)
           for i in range(num_processes)]
  logs = []
  for p in procs:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-4000:]
    logs.append(out)
  outs = [json.load(open(tmp / f"{name}_{i}")) for i in range(num_processes)]
  params = dict(np.load(tmp / f"{name}_params.npz")) if (tmp / f"{name}_params.npz").exists() else None
  return outs, params, logs


def _restore_line(log):
  lines = [line for line in log.splitlines() if "Restored checkpoint step" in line]
  assert len(lines) == 1, log[-4000:]
  return lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Phase 1: 2 processes train 3 steps (24 examples). Phase 2: 1 process resumes, trains steps 4-5
  (40 examples). Phase 3: 2 processes resume from step 5 and read one batch."""
  tmp = tmp_path_factory.mktemp("resize")
  _write_id_shards(tmp / "ids")
  phases = {
      "two": _run_phase(tmp, "two", 2, 4, "4,2", ["--steps=3"]),
      "one": _run_phase(tmp, "one", 1, 4, "2,2", ["--steps=5"]),
      "two_again": _run_phase(tmp, "two_again", 2, 4, "4,2", ["--steps=5"]),
  }
  return tmp, phases


def _expected_skip(consumed, process_index, process_count):
  """The documented rule, independently: this epoch's examples, split as evenly as can be, the first hosts +1."""
  in_epoch = consumed % NUM_IDS
  return in_epoch // process_count + (process_index < in_epoch % process_count)


def _assert_params_equal_checkpoint(params, workdir, step):
  saved, saved_step = checkpoints.load_params_from_workdir(workdir, step)
  saved = traverse_util.flatten_dict(saved, sep="/")
  assert saved_step == step and saved.keys() == params.keys()
  for key, value in saved.items():
    np.testing.assert_array_equal(params[key], value, err_msg=key)


def test_two_processes_resumed_by_one(runs):
  tmp, phases = runs
  (two, _, _), (one, params, logs) = phases["two"], phases["one"]
  # Phase 1 read its own hosts' fresh streams (this checks the reference as well).
  for p in range(2):
    assert two[p]["process_count"] == 2 and two[p]["device_count"] == 8
    fresh = _fresh_labels(str(tmp / "ids"), p, 2, 12)
    assert sum(two[p]["labels"], []) == fresh
  [one] = one
  assert (one["process_count"], one["device_count"], one["restored_step"]) == (1, 4, 3)
  _assert_params_equal_checkpoint(params, str(tmp / "run"), 3)
  skip = _expected_skip(3 * GLOBAL_BATCH, 0, 1)
  assert skip == 8
  assert sum(one["labels"], []) == _fresh_labels(str(tmp / "ids"), 0, 1, skip + 16)[skip:]
  line = _restore_line(logs[0])
  assert "Exact: the train state (step 3; saved by 2 process(es) on 8 devices, restored by 1 on 4)" in line
  assert ("Approximate: the input position (no iterator state for process 0 of 1 (saved by 2 process(es)); "
          "24 examples consumed (8 of them in the current epoch of 16)") in line
  assert "this one (process 0) skips 8 raw records" in line


def test_one_process_resumed_by_two(runs):
  tmp, phases = runs
  outs, params, logs = phases["two_again"]
  _assert_params_equal_checkpoint(params, str(tmp / "run"), 5)
  consumed = 3 * GLOBAL_BATCH + 2 * GLOBAL_BATCH
  for p, (out, log) in enumerate(zip(outs, logs)):
    assert (out["process_count"], out["device_count"], out["restored_step"]) == (2, 8, 5)
    skip = _expected_skip(consumed, p, 2)
    assert skip == 4
    assert out["labels"] == [_fresh_labels(str(tmp / "ids"), p, 2, skip + 4)[skip:]]
    line = _restore_line(log)
    assert "Exact: the train state (step 5; saved by 1 process(es) on 4 devices, restored by 2 on 8)" in line
    assert f"no iterator state for process {p} of 2 (saved by 1 process(es)); 40 examples consumed" in line
    assert f"this one (process {p}) skips 4 raw records" in line


def _restore_in_process(shards, workdir, step, caplog):
  """Restores ``step`` here (1 process, 8 devices) as the loop does; returns the iterator and the log line."""
  config = _config(shards, mesh_shape=(4, 2))
  trainer = train.Trainer(config, steps_per_epoch=100)
  it = train.create_train_iterator(config)
  manager = checkpoints.create_manager(workdir, read_only=True, async_save=False)
  absl_logging.set_verbosity(absl_logging.INFO)
  with caplog.at_level("INFO"):
    state = checkpoints.restore_latest(manager, trainer.abstract_target(), it, step=step)
  manager.close()
  assert int(state.step) == step
  return it, _restore_line(caplog.text)


def test_same_process_count_restores_exactly(runs, caplog):
  # Step 5 was saved by 1 process: this 1-process restore takes its iterator state, not the rule.
  tmp, _ = runs
  it, line = _restore_in_process(str(tmp / "ids"), str(tmp / "run"), 5, caplog)
  assert "Exact: the train state (step 5) and the input position (saved by 1 process(es) on 4 devices" in line
  assert [int(x) for x in next(it)["label"]] == _fresh_labels(str(tmp / "ids"), 0, 1, 32)[24:]
  assert it.examples_consumed == 6 * GLOBAL_BATCH


def test_missing_state_and_count_starts_the_data_afresh(runs, tmp_path, caplog):
  # A checkpoint of 2 processes without its global count (position.json), as older checkpoints are.
  tmp, _ = runs
  shutil.copytree(tmp / "run" / "checkpoints" / "3", tmp_path / "checkpoints" / "3")
  os.remove(tmp_path / "checkpoints" / "3" / "data" / checkpoints.POSITION_FILE)
  it, line = _restore_in_process(str(tmp / "ids"), str(tmp_path), 3, caplog)
  assert "Not restored: the input position (no iterator state for process 0 of 1 (saved by 2 process(es))" in line
  assert [int(x) for x in next(it)["label"]] == _fresh_labels(str(tmp / "ids"), 0, 1, 8)
  assert it.examples_consumed is None


@pytest.mark.parametrize("consumed,epoch,hosts", [(40, 16, 2), (7, None, 3), (33, 10, 4), (5, 16, 8)])
def test_records_to_skip_shares_this_epoch_over_the_hosts(consumed, epoch, hosts):
  skips = [records_to_skip(consumed, epoch, p, hosts)[0] for p in range(hosts)]
  in_epoch = consumed % epoch if epoch else consumed
  assert sum(skips) == in_epoch and max(skips) - min(skips) <= 1 and skips == sorted(skips, reverse=True)
