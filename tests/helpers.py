"""The tests' shared set-up, as plain functions (the fixtures built on them are in conftest.py).

  configs    ``tiny_config`` (a tiny model and the official SGD recipe, for training), ``tiny_model_config``
             (the same model for inference: export, predict, visualize, artifacts), ``data_config``
  train      ``global_batch`` / ``StreamIterator`` (a deterministic stream), ``run_steps``
  eval       ``synthetic_eval_batches`` / ``use_synthetic_eval`` (the loop's eval without shards)
  artifacts  ``save_random_checkpoint`` (a random tiny model as a converted checkpoint with its card)
  processes  ``free_port``, ``start_worker`` (tests/multihost_worker.py in a subprocess)

Importing it puts the repository root on ``sys.path`` (``benchmarks`` holds the PyTorch reference model).
tests/multihost_worker.py, a script run in subprocesses, imports it too: jax and the library are imported
inside the functions, so that the worker can set its device count first.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")

NUM_CLASSES = 5
GLOBAL_BATCH = 8
# The tiny model: four stages of one block, 3x3 depthwise only (the same code paths, faster compiles).
TINY_MODEL = dict(embed_dim=8, depths=(1, 1, 1, 1), focal_levels=(1, 1, 1, 1))


# --- Configs. -------------------------------------------------------------------------------------


def override(config, overrides):
  """Sets ``overrides`` (``{"a.b": value}``: dotted paths into the config) in ``config``; returns it."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def tiny_model_config(num_classes: int = NUM_CLASSES, clips: int = 1, crops: int = 1, **overrides):
  """The official recipe with a few-thousand-parameter model of 4 frames of 32 px (float32, no drop-path)."""
  from vfocal_jax.configs import default  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.num_frames, config.image_size = 4, 32
  config.test_num_clips, config.test_num_crops = clips, crops
  config.model.update(variant="custom", num_classes=num_classes, drop_path_rate=0.0, dtype="float32", **TINY_MODEL)
  return override(config, overrides)


def tiny_config(**overrides):
  """The tiny model (drop-path 0.1) and the official SGD recipe on ``GLOBAL_BATCH`` clips; one step a log."""
  config = tiny_model_config(**{"model.variant": "tiny", "model.drop_path_rate": 0.1})
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
  config.async_checkpointing = False
  return override(config, overrides)


def data_config(shards=None, **fields):
  """The data config with 2 decode threads, ``shards`` (a directory) for training and eval, then ``fields``."""
  from vfocal_jax.configs import data  # pylint: disable=import-outside-toplevel
  cfg = data.get_config()
  cfg.num_threads = 2
  if shards is not None:
    cfg.train_shards = cfg.eval_shards = str(shards)
  return override(cfg, fields)


def shards_config(shards, num_classes: int, **overrides):
  """``tiny_config`` on the shards in ``shards`` (labels 0..num_classes-1) read in stream order.

  No record shuffle, every file open at once.
  """
  return tiny_config(**{"model.num_classes": num_classes, "data.num_classes": num_classes,
                        "data.train_shards": shards, "data.shuffle_buffer_size": 1,
                        "data.cycle_length": 64, "data.num_threads": 2, **overrides})


# --- A deterministic train stream and a synthetic eval. -------------------------------------------


def global_batch(step: int, config) -> dict:
  """Batch number ``step`` of a deterministic stream (the same on every process)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
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
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(7)
  video = rng.normal(size=(8, 1, config.num_frames, config.image_size, config.image_size, 3)).astype(np.float32)
  return [{"video": video, "label": rng.integers(0, NUM_CLASSES, 8).astype(np.int32), "mask": np.arange(8) < n}]


def use_synthetic_eval(set_attribute=setattr) -> None:
  """The loop's eval reads ``synthetic_eval_batches`` instead of shards, and has no class names.

  In a test, pass ``monkeypatch.setattr`` (undone after the test), or use conftest's ``synthetic_eval``.
  """
  from vfocal_jax import evaluate  # pylint: disable=import-outside-toplevel
  set_attribute(evaluate, "create_eval_iterator", lambda config, clips, crops: synthetic_eval_batches(config))
  set_attribute(evaluate, "_class_names", lambda config: None)


# --- Training and checkpoints. --------------------------------------------------------------------


def barrier(name: str) -> None:
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
  import jax  # pylint: disable=import-outside-toplevel
  from vfocal_jax import sharding, train  # pylint: disable=import-outside-toplevel
  trainer = train.Trainer(config, steps_per_epoch=100, mesh=mesh, **trainer_kwargs)
  key = jax.random.PRNGKey(config.seed)
  init = jax.jit(trainer._init, out_shardings=trainer.state_sharding).lower(key).compile()  # pylint: disable=protected-access
  it = StreamIterator(config, jax.process_index(), jax.process_count())
  batches = [trainer.put_batch(next(it)) for _ in range(num_steps)]
  losses = []
  with trainer.mesh:
    step = trainer.train_step.lower(trainer.abstract_target(), batches[0]).compile()
    barrier("run_steps_compiled")
    state = init(key)
    for batch in batches:
      state, metrics = step(state, batch)
      losses.append(float(sharding.to_host(metrics.compute())["loss"]))
  return losses, sharding.to_host(state.params)


def save_random_checkpoint(directory, config, *, seed: int = 0, head_scale: float | None = None,
                           class_names=None):
  """The model of ``config`` with random parameters, saved with its card: (model, params, checkpoint path).

  ``head_scale`` multiplies the head's kernel (a decisive head: logits of a few units, not ~1e-3).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from vfocal_jax import artifacts, model_card, params_io  # pylint: disable=import-outside-toplevel
  model = artifacts.build_model(config)
  params = jax.tree.map(np.asarray, artifacts.init_params(model, jax.random.key(seed), config.num_frames,
                                                          config.image_size))
  if head_scale is not None:
    params["head"]["kernel"] = params["head"]["kernel"] * head_scale
  card = model_card.card_from_config(config, model, class_names=class_names)
  return model, params, params_io.save_params(directory, params, card)


# --- Processes. -----------------------------------------------------------------------------------


def free_port() -> int:
  """A TCP port free on 127.0.0.1 now (for the jax.distributed coordinator, a local server)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_worker(*args: str, env=None) -> subprocess.Popen:
  """tests/multihost_worker.py with ``args``, on the CPU, quiet TensorFlow; stdout and stderr together (text).

  ``env``: more environment variables. conftest's cheap XLA flags are inherited; the device count is the
  worker's flag.
  """
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", **(env or {}))
  return subprocess.Popen([sys.executable, WORKER, *map(str, args)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
