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

from helpers import (NUM_CLASSES, StreamIterator, barrier, run_steps, shards_config, tiny_config,
                     use_synthetic_eval)


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
  config = shards_config(args.shards, args.num_classes, mesh_shape=tuple(int(x) for x in args.mesh.split(",")))
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
      barrier("resume_main_compiled")
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
