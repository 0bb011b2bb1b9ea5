"""A tiny training run used by the train tests, in-process or as one of several processes.

    python tests/multihost_worker.py --num_processes=2 --process_id=0 --port=12345 --out=/tmp/p0.json
    python tests/multihost_worker.py --workdir=/tmp/run --steps=100000      # the whole loop (train_and_evaluate)
    python tests/multihost_worker.py --workdir=/tmp/run --shards=/tmp/ids --steps=5 --out=/tmp/p{process}.json \
        --num_classes=16 --num_processes=2 --process_id=0 --port=12345 --devices_per_process=4 --mesh=4,2

Each process feeds its own rows of every global batch (rows are split in
process order), as the input pipeline does on a multi-host run. With
``--workdir`` the process runs ``train.train_and_evaluate`` as the command
line does (exits with ``preemption.EXIT_PREEMPTED`` on SIGTERM), on the
deterministic stream and one synthetic eval batch. With ``--shards`` too it
resumes the workdir (or starts it) on the real input pipeline over those
shards (labels are ids: ``--num_classes`` of them) and trains up to
``--steps`` (``resume_main``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

NUM_CLASSES = 5
GLOBAL_BATCH = 8


def tiny_config(**overrides):
  """A few-thousand-parameter Video-FocalNet and the official SGD recipe."""
  from vfocal_jax.configs import default
  config = default.get_config()
  config.num_frames = 4
  config.image_size = 32
  config.model.variant = "tiny"
  config.model.embed_dim = 8
  config.model.depths = (1, 1, 1, 1)
  config.model.focal_levels = (1, 1, 1, 1)  # 3x3 depthwise only: the same code paths, faster compiles
  config.model.num_classes = NUM_CLASSES
  config.model.drop_path_rate = 0.1
  config.model.dtype = "float32"
  config.batch_size = GLOBAL_BATCH
  config.eval_batch_size = GLOBAL_BATCH
  config.base_lr = 64.0  # x 8 / 512 = 1.0: big steps make any gradient error visible.
  config.warmup_lr = 64.0
  config.min_lr = 64.0
  config.num_train_steps = 6
  config.warmup_steps = 0
  config.fsdp_min_size = 0
  config.log_every_steps = 1
  config.checkpoint_every_steps = 1000
  config.eval_every_epochs = 0.0
  config.test_num_clips = 1
  config.test_num_crops = 1
  config.async_checkpointing = False
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def global_batch(step: int, config) -> dict:
  """Batch number ``step`` of a deterministic stream (the same on every process)."""
  import numpy as np
  rng = np.random.default_rng((1234, step))
  labels = rng.integers(0, NUM_CLASSES, GLOBAL_BATCH).astype(np.int32)
  shape = (GLOBAL_BATCH, config.num_frames, config.image_size, config.image_size, 3)
  # As the input pipeline yields them: uint8 pixels and a per-clip colour map (normalisation + jitter).
  video = rng.integers(0, 256, size=shape, dtype=np.uint8)
  affine = np.concatenate([np.eye(3) / 58.0, np.full((1, 3), -2.0), np.zeros((1, 3))])
  affine = affine + rng.normal(size=(GLOBAL_BATCH, 5, 3)) * np.array([0.003] * 3 + [0.1, 0.001])[:, None]
  return {"video": video, "pixel_affine": affine.astype(np.float32), "label": labels}


class StreamIterator:
  """This process's rows of ``global_batch(0), global_batch(1), ...``; checkpointable."""

  def __init__(self, config, process_index: int = 0, process_count: int = 1):
    self.config, self.pos = config, 0
    self.index, self.count = process_index, process_count

  def __iter__(self):
    return self

  def __next__(self):
    batch = global_batch(self.pos, self.config)
    self.pos += 1
    n = GLOBAL_BATCH // self.count
    return {k: v[self.index * n:(self.index + 1) * n] for k, v in batch.items()}

  def save(self, path):
    with open(path, "w") as f:
      json.dump({"pos": self.pos}, f)

  def restore(self, path):
    with open(path) as f:
      self.pos = json.load(f)["pos"]


def synthetic_eval_batches(config, n=5):
  """One eval batch of random views: ``n`` real rows and padding (the eval pipeline's contract)."""
  import numpy as np
  rng = np.random.default_rng(7)
  video = rng.normal(size=(8, 1, config.num_frames, config.image_size, config.image_size, 3)).astype(np.float32)
  return [{"video": video, "label": rng.integers(0, NUM_CLASSES, 8).astype(np.int32), "mask": np.arange(8) < n}]


def use_synthetic_eval(set_attribute=setattr) -> None:
  """The loop's eval reads ``synthetic_eval_batches`` instead of shards, and has no class names.

  In a test, pass ``monkeypatch.setattr`` (undone after the test).
  """
  from vfocal_jax import evaluate  # pylint: disable=import-outside-toplevel
  set_attribute(evaluate, "create_eval_iterator", lambda config, clips, crops: synthetic_eval_batches(config))
  set_attribute(evaluate, "_class_names", lambda config: None)


def free_port() -> int:
  """A TCP port free on 127.0.0.1 now (for the jax.distributed coordinator)."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _barrier(name: str) -> None:
  """Waits for every process (the coordination service's barrier, not a collective: no 30 s Gloo deadline)."""
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  if distributed.global_state.client is not None:
    distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=600_000)


def run_steps(config, num_steps: int, mesh=None, **trainer_kwargs):
  """Trains ``num_steps`` steps; returns per-step losses and the final params (host NumPy).

  Both programs are compiled before the first one runs, and the processes
  meet at a barrier then: on a loaded machine their compiles can end more than
  Gloo's 30 s connection deadline apart.
  """
  import jax
  from vfocal_jax import sharding, train
  trainer = train.Trainer(config, steps_per_epoch=100, mesh=mesh, **trainer_kwargs)
  key = jax.random.PRNGKey(config.seed)
  init = jax.jit(trainer._init, out_shardings=trainer.state_sharding).lower(key).compile()  # pylint: disable=protected-access
  it = StreamIterator(config, jax.process_index(), jax.process_count())
  batches = [trainer.put_batch(next(it)) for _ in range(num_steps)]
  losses = []
  with trainer.mesh:
    step = trainer.train_step.lower(trainer.abstract_target(), batches[0]).compile()
    _barrier("run_steps_compiled")
    state = init(key)
    for batch in batches:
      state, metrics = step(state, batch)
      losses.append(float(sharding.to_host(metrics.compute())["loss"]))
  return losses, sharding.to_host(state.params)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--devices_per_process", type=int, default=2)
  parser.add_argument("--mesh", default="-1,1")
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--out")
  parser.add_argument("--workdir", help="run train_and_evaluate here instead")
  parser.add_argument("--log_every", type=int, default=2)
  parser.add_argument("--checkpoint_every", type=int, default=3)
  parser.add_argument("--shards", help="with --workdir: the input pipeline on these shards")
  parser.add_argument("--num_classes", type=int, default=NUM_CLASSES)
  args = parser.parse_args()

  import jax
  jax.config.update("jax_num_cpu_devices", args.devices_per_process)
  if args.num_processes > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                               process_id=args.process_id)
  if args.workdir:
    train_main(args)
    return
  import numpy as np
  from flax import traverse_util
  config = tiny_config(mesh_shape=tuple(int(x) for x in args.mesh.split(",")))
  losses, params = run_steps(config, args.steps)
  flat = traverse_util.flatten_dict(params, sep="/")
  if jax.process_index() == 0:
    with open(args.out, "w") as f:
      json.dump({"losses": losses, "device_count": jax.device_count(), "process_count": jax.process_count(),
                 "params": {k: np.asarray(v, np.float64).ravel().tolist() for k, v in flat.items()}}, f)


def shards_config(args, **overrides):
  """The tiny model on ``args.shards`` read in stream order (no record shuffle, every file open at once)."""
  return tiny_config(**{"model.num_classes": args.num_classes, "data.num_classes": args.num_classes,
                        "data.train_shards": args.shards, "data.shuffle_buffer_size": 1,
                        "data.cycle_length": 64, "data.num_threads": 2, **overrides})


class RecordingIterator:
  """Passes batches (and the checkpoint calls) through, keeping each batch's labels."""

  def __init__(self, inner):
    self.inner, self.labels = inner, []

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.inner)
    self.labels.append([int(x) for x in batch["label"]])
    return batch

  def __getattr__(self, name):  # save, restore, position, restore_position
    return getattr(self.inner, name)


def train_main(args):
  """``train.train_and_evaluate`` in ``args.workdir``, logging at INFO to stderr as the command line does."""
  from absl import logging
  from vfocal_jax import train
  logging.set_verbosity(logging.INFO)
  logging.use_absl_handler()
  if args.shards:
    resume_main(args)
    return
  use_synthetic_eval()
  config = tiny_config(mesh_shape=tuple(int(x) for x in args.mesh.split(",")), num_train_steps=args.steps,
                       log_every_steps=args.log_every, checkpoint_every_steps=args.checkpoint_every,
                       async_checkpointing=True)
  train.train_and_evaluate(config, args.workdir, train_iter=StreamIterator(config), steps_per_epoch=100)


def resume_main(args):
  """Resumes ``args.workdir`` as the loop does (or starts it), trains up to ``--steps`` and checkpoints there.

  The loop's own calls (``checkpoints.restore_latest`` with the trainer's
  target and the pipeline's iterator, the train step, ``checkpoints.save``),
  with both programs compiled before the processes meet at a barrier (see
  ``run_steps``). Already at ``--steps``: reads one batch instead. ``--out``
  gets the restored step, the labels of every batch read and (``params.npz``,
  process 0) the restored parameters.
  """
  import jax
  import numpy as np
  from flax import traverse_util
  from vfocal_jax import checkpoints, sharding, train
  config = shards_config(args, mesh_shape=tuple(int(x) for x in args.mesh.split(",")))
  trainer = train.Trainer(config, steps_per_epoch=100)
  train_iter = RecordingIterator(train.create_train_iterator(config))
  manager = checkpoints.create_manager(args.workdir, async_save=False)
  state = checkpoints.restore_latest(manager, trainer.abstract_target(), train_iter)
  out = {"process_index": jax.process_index(), "process_count": jax.process_count(),
         "device_count": jax.device_count(), "restored_step": None}
  if state is not None:
    out["restored_step"] = int(sharding.to_host(state.step))
    params = traverse_util.flatten_dict(sharding.to_host(state.params), sep="/")
    if jax.process_index() == 0:
      np.savez(args.out.format(process="params") + ".npz", **params)
  start = out["restored_step"] or 0
  if start >= args.steps:
    next(train_iter)
  else:
    key = jax.random.PRNGKey(config.seed)
    init = jax.jit(trainer._init, out_shardings=trainer.state_sharding).lower(key).compile()  # pylint: disable=protected-access
    batches = [trainer.put_batch(next(train_iter)) for _ in range(start, args.steps)]
    with trainer.mesh:
      step = trainer.train_step.lower(trainer.abstract_target(), batches[0]).compile()
      _barrier("resume_main_compiled")
      state = init(key) if state is None else state
      for batch in batches:
        state, _ = step(state, batch)
    checkpoints.save(manager, args.steps, state, train_iter, force=True)
    checkpoints.wait_until_finished(manager, args.steps)
  manager.close()
  out["labels"] = train_iter.labels
  with open(args.out.format(process=jax.process_index()), "w") as f:
    json.dump(out, f)


if __name__ == "__main__":
  main()
