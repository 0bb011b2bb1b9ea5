"""Compiling ``plan``'s steps: the target config, the abstract batch, the train / eval step compiles, the batch search.

``compile_steps`` builds what ``train`` builds (the ``Trainer``: model,
optimizer, shardings, the donated train step) and the final test's eval
step, traces them with abstract inputs (``batch``'s fields, sharded as
``batch.shardings``), counts the traced step's MACs, and compiles them for
the mesh's devices (compile-only TPUs or GPUs, or the local ones).
``search_batch_variants`` compiles the train step again and again to find the
largest batch per chip that fits.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable

import jax
import ml_collections

from vfocal_jax import batch, config_fields, sharding, summary, tpu_specs
from vfocal_jax.models.layers import resolve_depthwise_impl
from vfocal_jax.plan_report import BatchSearchResult

MAX_BATCH_PER_SHARD = 1 << 14  # Upper end of the batch search (per 'data' shard).
PIXEL_AFFINE_ROWS = 5  # pixel_affine is (B, 5, 3): pixels.normalize's colour jitter and normalisation.


def target_config(config: ml_collections.ConfigDict, platform: str, num_devices: int,
                  **fields: Any) -> ml_collections.ConfigDict:
  """A copy with ``fields`` (``{"model.remat": True}``) set and the backend's kernel choice made for the target."""
  model_axis = sharding.resolve_mesh_shape(config.mesh_shape, num_devices)[1]
  depthwise_impl = resolve_depthwise_impl(config.model.get("depthwise_impl", "auto"), platform=platform,
                                          model_axis=model_axis)
  config = config_fields.updated(config, fields)  # Locked as given: a misspelt field is an error.
  return config_fields.updated(config, {"model.depthwise_impl": depthwise_impl}, new_fields=True)


def build_mesh(config: ml_collections.ConfigDict, devices: list):
  return sharding.create_mesh(config.mesh_shape, devices)


def _batch_specs(mesh, fields: dict[str, int], lead: tuple[int, ...], video: tuple[int, ...]):
  """Abstract arrays of ``batch``'s fields: ``lead`` + the field's own trailing dims, sharded as batch.shardings."""
  trailing = {"video": video, "pixel_affine": (PIXEL_AFFINE_ROWS, 3), "label": (), "mask": ()}
  shardings = batch.shardings(mesh, fields)
  out = {}
  for name, ndim in fields.items():
    shape = (lead[0],) + (lead[1:] if name == "video" else ()) + trailing[name]
    assert len(shape) == ndim, (name, shape, ndim)
    out[name] = jax.ShapeDtypeStruct(shape, batch.FIELD_DTYPES[name], sharding=shardings[name])
  return out


def train_batch_specs(config, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The train step's batch: all micro-batches of one update (``batch_size * accumulation_steps`` clips)."""
  b = int(config.batch_size) * max(int(config.accumulation_steps), 1)
  t, s = int(config.num_frames), int(config.image_size)
  return _batch_specs(mesh, batch.TRAIN_FIELDS, (b,), (t, s, s, 3))


def eval_views(config) -> int:
  return int(config.test_num_clips) * int(config.test_num_crops)


def eval_batch_specs(config, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The final test's batch: ``eval_batch_size`` videos, each with all its views."""
  b, v, t, s = int(config.eval_batch_size), eval_views(config), int(config.num_frames), int(config.image_size)
  return _batch_specs(mesh, batch.EVAL_FIELDS, (b, v), (t, s, s, 3))


def check_batch(name: str, size: int, data: int) -> str | None:
  if size % data:
    return f"{name}={size} does not divide over the 'data' mesh axis ({data}); use a multiple of {data}."
  return None


# --- Compiling. ------------------------------------------------------------------------------

@dataclasses.dataclass
class CompileAttempt:
  """One step's lowering and compile: the executable, or the error (one line) and whether it is out of memory."""
  compiled: Any = None
  error: str | None = None
  oom: bool = False
  lower_seconds: float | None = None
  compile_seconds: float | None = None
  failed_after_seconds: float | None = None
  model_flops: float | None = None  # 2 x the MACs of the traced step (all devices together).


@dataclasses.dataclass
class CompiledSteps:
  trainer: Any
  train: CompileAttempt | None = None
  eval: CompileAttempt | None = None


def compile_steps(config, mesh, *, train: bool = True, eval: bool = True) -> CompiledSteps:
  """Traces, lowers and compiles the train and/or eval step for ``mesh``.

  Compile errors (out of memory included) are caught and summarised in one
  line; a batch that does not divide is reported, not compiled. The traced
  step's matmul and convolution MACs (``summary.count_jaxpr_macs``) give
  ``model_flops``.
  """
  from vfocal_jax import evaluate
  from vfocal_jax.train import Trainer
  steps = int(config.get("num_train_steps", -1))
  trainer = Trainer(config, steps_per_epoch=steps if steps > 0 else 1000, mesh=mesh)
  data = mesh.shape[sharding.DATA]
  out = CompiledSteps(trainer)
  jobs = []
  if train:
    jobs.append(("train", check_batch("batch_size", int(config.batch_size), data),
                 lambda: trainer.train_step.trace(trainer.abstract_target(), train_batch_specs(config, mesh))))
  if eval:
    def trace_eval():
      step = evaluate.make_eval_step(trainer.model, trainer.num_classes, mesh, trainer.state_sharding.params)
      return step.trace(trainer.abstract_target().params, eval_batch_specs(config, mesh))
    jobs.append(("eval", check_batch("eval_batch_size", int(config.eval_batch_size), data), trace_eval))
  for name, error, trace in jobs:
    attempt = CompileAttempt(error=error)
    setattr(out, name, attempt)
    if error:
      continue
    t0 = time.perf_counter()
    try:
      traced = trace()
      attempt.model_flops = 2.0 * summary.count_jaxpr_macs(traced.jaxpr)
      lowered = traced.lower()
      t1 = time.perf_counter()
      attempt.lower_seconds = t1 - t0
      with _no_cache_writes(mesh.devices.flat[0].platform != jax.default_backend()):
        attempt.compiled = lowered.compile()
      attempt.compile_seconds = time.perf_counter() - t1
    except (jax.errors.JaxRuntimeError, ValueError, RuntimeError, TypeError) as e:
      attempt.error = tpu_specs.summarize_error(e)
      attempt.oom = tpu_specs.is_out_of_memory(e)
      attempt.failed_after_seconds = time.perf_counter() - t0
  return out


@contextlib.contextmanager
def _no_cache_writes(active: bool):
  """Keeps compile-only executables out of JAX's persistent cache (they cannot be loaded back here)."""
  if not active:
    yield
    return
  old = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e12)
  try:
    yield
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old)


# --- The batch search. ----------------------------------------------------------------------

def search_largest(fits: Callable[[int], bool], start: int = 1, limit: int = MAX_BATCH_PER_SHARD) -> int | None:
  """The largest ``n`` in [1, limit] with ``fits(n)``, assuming fits is monotone (doubling, then bisection)."""
  start = max(1, min(int(start), limit))
  if fits(start):
    lo, hi = start, None
    while hi is None:
      n = min(lo * 2, limit)
      if n == lo:
        return lo
      if fits(n):
        lo = n
      else:
        hi = n
  else:
    lo, hi = 0, start
    while lo == 0:
      n = hi // 2
      if n < 1:
        return None
      if fits(n):
        lo = n
      else:
        hi = n
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if fits(mid):
      lo = mid
    else:
      hi = mid
  return lo


def search_batch_variants(config, mesh, *, hbm_bytes: int, devices_per_chip: int, num_chips: int,
                          platform: str = "tpu", log: Callable[[str], None] = print) -> list[BatchSearchResult]:
  """Largest train batch per chip that compiles and fits, for the config and with remat / FSDP turned on."""
  data = mesh.shape[sharding.DATA]
  remat, fsdp = bool(config.model.get("remat", False)), bool(config.get("fsdp", False))
  variants = [(remat, fsdp)]
  if not remat:
    variants.append((True, fsdp))
  if not fsdp and data > 1:
    variants.append((remat, True))
    if not remat:
      variants.append((True, True))
  accum = max(int(config.accumulation_steps), 1)
  results = []
  for r, f in variants:
    t0, count = time.perf_counter(), [0]

    def fits(n, r=r, f=f):
      count[0] += 1
      cfg = target_config(config, platform, mesh.size, **{"model.remat": r, "fsdp": f, "batch_size": n * data})
      attempt = compile_steps(cfg, mesh, eval=False).train
      total = tpu_specs.memory_stats(attempt.compiled)["total"] if attempt.compiled else None
      ok = attempt.compiled is not None and (total is None or total * devices_per_chip <= hbm_bytes)
      log(f"  search remat={r} fsdp={f}: {n * data * accum / num_chips:g} clips/chip -> "
          f"{'fits' if ok else 'does not fit: ' + str(attempt.error or 'over HBM')}")
      return ok

    n = search_largest(fits, start=max(int(config.batch_size) // data, 1))
    results.append(BatchSearchResult(remat=r, fsdp=f, max_batch_per_chip=None if n is None else
                                     n * data * accum / num_chips, compiles=count[0],
                                     seconds=time.perf_counter() - t0))
  return results
