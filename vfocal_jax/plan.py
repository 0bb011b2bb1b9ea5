"""``plan``: compile the real train and eval steps for a TPU slice on this host, report memory and cost.

    python main.py plan --config=configs/k400_tiny.py --topology=v5e:2x2 [--json=FILE] [--search_batch]

The steps are the ones training runs (``train.Trainer``'s jitted step with its
shardings, ``evaluate.make_eval_step`` over every view of a batch), lowered
with abstract inputs on a ``('data', 'model')`` mesh of compile-only TPU
devices (``jax.experimental.topologies``; needs ``libtpu``, no TPU) and
compiled by the TPU compiler. Every figure is the compiler's: per-chip memory
from ``memory_analysis()``, FLOPs and the estimated step time
(``optimal_seconds``, its cost model) from ``cost_analysis()``, collectives
from the compiled HLO, and where the memory traffic goes, per part of the model
and per op (``hlo_traffic``). Nothing runs on a TPU. ``topology=None``/``'local'``
plans for the devices at hand and can also time the step (``measure``).
See docs/plan.md.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vfocal_jax import hlo_traffic, sharding, tpu_specs
from vfocal_jax.models.layers import resolve_depthwise_impl

LOCAL = "local"
MAX_BATCH_PER_SHARD = 1 << 14  # Upper end of the batch search (per 'data' shard).


# --- Target devices and config. --------------------------------------------------------------

def target_devices(topology: str | None) -> list:
  """The devices to compile for: compile-only TPU devices of ``topology`` (``'v5e:2x2'``), or the local ones."""
  if topology in (None, "", LOCAL):
    return list(jax.devices())
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # No metadata server to ask: this is not a TPU VM.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # Compile-only: no chip to lock; other plans may run.
  from jax.experimental import topologies
  try:
    try:
      return list(topologies.get_topology_desc(topology, platform="tpu").devices)
    except Exception as e:  # Fewer chips than one default host (v5e:1x1): the slice is its own host.
      dims = [int(d) for d in topology.split(":")[-1].split("x")] if ":" in topology else []
      if "chips_per_host_bounds" not in str(e) or not dims or not all(d > 0 for d in dims):
        raise
      bounds = tuple(dims + [1] * (3 - len(dims)))
      return list(topologies.get_topology_desc(topology, platform="tpu", chips_per_host_bounds=bounds).devices)
  except Exception as e:  # Unknown name, libtpu missing, ...
    raise ValueError(f"--topology={topology}: no TPU topology of that name could be built "
                     f"({tpu_specs.summarize_error(e, 200)}); e.g. v5e:2x2, v5e:2x4, v4:2x2x1, v5p:2x2x1, "
                     "v6e:2x2 (needs libtpu).") from None


def target_config(config: ml_collections.ConfigDict, platform: str, num_devices: int,
                  **overrides) -> ml_collections.ConfigDict:
  """An unlocked copy with backend-dependent choices resolved for the target platform, not the host's."""
  config = ml_collections.ConfigDict(config.to_dict())
  model_axis = sharding.resolve_mesh_shape(config.mesh_shape, num_devices)[1]
  config.model.depthwise_impl = resolve_depthwise_impl(config.model.get("depthwise_impl", "auto"),
                                                       platform=platform, model_axis=model_axis)
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def build_mesh(config: ml_collections.ConfigDict, devices: list):
  return sharding.create_mesh(config.mesh_shape, devices)


def train_batch_specs(config, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The train step's batch: all micro-batches of one update (``batch_size * accumulation_steps`` clips)."""
  b = int(config.batch_size) * max(int(config.accumulation_steps), 1)
  t, s = int(config.num_frames), int(config.image_size)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
  return {"video": spec((b, t, s, s, 3), jnp.uint8), "pixel_affine": spec((b, 5, 3), jnp.float32),
          "label": spec((b,), jnp.int32)}


def eval_views(config) -> int:
  return int(config.test_num_clips) * int(config.test_num_crops)


def eval_batch_specs(config, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The final test's batch: ``eval_batch_size`` videos, each with all its views."""
  b, v, t, s = int(config.eval_batch_size), eval_views(config), int(config.num_frames), int(config.image_size)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
  return {"video": spec((b, v, t, s, s, 3), jnp.uint8), "pixel_affine": spec((b, 5, 3), jnp.float32),
          "label": spec((b,), jnp.int32), "mask": spec((b,), jnp.bool_)}


def check_batch(name: str, batch: int, data: int) -> str | None:
  if batch % data:
    return f"{name}={batch} does not divide over the 'data' mesh axis ({data}); use a multiple of {data}."
  return None


# --- Compiling. ------------------------------------------------------------------------------

def compile_steps(config, mesh, *, train: bool = True, eval: bool = True) -> dict[str, Any]:
  """Lowers and compiles the train and/or eval step for ``mesh``.

  Returns ``{'train': attempt, 'eval': attempt}`` where an attempt is
  ``{'compiled', 'error', 'oom', 'lower_seconds', 'compile_seconds'}`` and
  ``'trainer'``. Compile errors (out of memory included) are caught and
  summarised in one line; a batch that does not divide is reported, not compiled.
  """
  from vfocal_jax import evaluate
  from vfocal_jax.train import Trainer
  steps = int(config.get("num_train_steps", -1))
  trainer = Trainer(config, steps_per_epoch=steps if steps > 0 else 1000, mesh=mesh)
  data = mesh.shape[sharding.DATA]
  out: dict[str, Any] = {"trainer": trainer}
  jobs = []
  if train:
    jobs.append(("train", check_batch("batch_size", int(config.batch_size), data),
                 lambda: trainer.train_step.lower(trainer.abstract_target(), train_batch_specs(config, mesh))))
  if eval:
    def lower_eval():
      step = evaluate.make_eval_step(trainer.model, trainer.num_classes, mesh, trainer.state_sharding.params)
      return step.lower(trainer.abstract_target().params, eval_batch_specs(config, mesh))
    jobs.append(("eval", check_batch("eval_batch_size", int(config.eval_batch_size), data), lower_eval))
  for name, error, lower in jobs:
    attempt = {"compiled": None, "error": error, "oom": False, "lower_seconds": None, "compile_seconds": None}
    out[name] = attempt
    if error:
      continue
    t0 = time.perf_counter()
    try:
      lowered = lower()
      t1 = time.perf_counter()
      attempt["lower_seconds"] = t1 - t0
      with _no_cache_writes(mesh.devices.flat[0].platform != jax.default_backend()):
        attempt["compiled"] = lowered.compile()
      attempt["compile_seconds"] = time.perf_counter() - t1
    except (jax.errors.JaxRuntimeError, ValueError, RuntimeError, TypeError) as e:
      attempt["error"] = tpu_specs.summarize_error(e)
      attempt["oom"] = tpu_specs.is_out_of_memory(e)
      attempt["failed_after_seconds"] = time.perf_counter() - t0
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


def analyze(attempt: dict[str, Any], *, devices_per_chip: int, chip: tpu_specs.ChipSpec | None,
            hbm_bytes: int | None, clips: int, videos: int, num_chips: int) -> dict[str, Any]:
  """The report of one step from its compile attempt (per chip = per device x devices per chip)."""
  k = devices_per_chip
  section: dict[str, Any] = {
      "ok": attempt["compiled"] is not None, "error": attempt["error"], "global_batch": videos,
      "batch_per_chip": videos / num_chips, "clips_per_chip": clips / num_chips,
      "lower_seconds": attempt["lower_seconds"], "compile_seconds": attempt["compile_seconds"],
      "failed_after_seconds": attempt.get("failed_after_seconds"),
      "hbm_bytes_per_chip": hbm_bytes, "fits": False if attempt["oom"] else None,
      "memory_per_chip": None, "total_bytes_per_chip": None, "flops_per_chip": None,
      "bytes_accessed_per_chip": None, "estimated_step_seconds": None, "estimated_clips_per_second_per_chip": None,
      "estimated_mfu": None, "roofline_step_seconds": None, "cost_analysis_raw": None,
      "unmodelled_custom_calls": None, "collectives": None, "traffic": None}
  compiled = attempt["compiled"]
  if compiled is None:
    return section
  try:
    text = compiled.as_text()
  except Exception:  # No text for this executable.
    text = None
  mem = {key: (None if v is None else v * k) for key, v in tpu_specs.memory_stats(compiled).items()}
  cost = tpu_specs.cost_stats(compiled, text)
  total = mem.pop("total")
  section["memory_per_chip"] = mem
  section["total_bytes_per_chip"] = total
  if total is not None and hbm_bytes:
    section["fits"] = total <= hbm_bytes
  apply_cost(section, cost, chip=chip, devices_per_chip=k)
  if text is not None:
    section["collectives"] = tpu_specs.collectives(text)
    section["traffic"] = hlo_traffic.breakdown(text, per=max(clips / (num_chips * k), 1e-9))
  return section


def apply_cost(section: dict[str, Any], cost: dict[str, Any], *, chip: tpu_specs.ChipSpec | None,
               devices_per_chip: int) -> None:
  """Fills a section's FLOPs, bytes, estimated time, clips/s, MFU and roofline from ``tpu_specs.cost_stats``."""
  k = devices_per_chip
  section["flops_per_chip"] = None if cost["flops"] is None else cost["flops"] * k
  section["bytes_accessed_per_chip"] = None if cost["bytes_accessed"] is None else cost["bytes_accessed"] * k
  section["cost_analysis_raw"], section["unmodelled_custom_calls"] = cost["raw"], cost["unmodelled"]
  section["roofline_step_seconds"] = tpu_specs.roofline_seconds(
      section["flops_per_chip"], section["bytes_accessed_per_chip"], chip)
  t = cost["optimal_seconds"]
  section["estimated_step_seconds"] = t
  section["estimated_clips_per_second_per_chip"] = section["clips_per_chip"] / t if t else None
  section["estimated_mfu"] = (section["flops_per_chip"] / (t * chip.peak_bf16_flops)
                              if t and chip is not None and section["flops_per_chip"] is not None else None)


# --- Batch search and measurement. -----------------------------------------------------------

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
                          platform: str = "tpu", log: Callable[[str], None] = print) -> list[dict[str, Any]]:
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
      attempt = compile_steps(cfg, mesh, eval=False)["train"]
      total = tpu_specs.memory_stats(attempt["compiled"])["total"] if attempt["compiled"] else None
      ok = attempt["compiled"] is not None and (total is None or total * devices_per_chip <= hbm_bytes)
      log(f"  search remat={r} fsdp={f}: {n * data * accum / num_chips:g} clips/chip -> "
          f"{'fits' if ok else 'does not fit: ' + str(attempt['error'] or 'over HBM')}")
      return ok

    n = search_largest(fits, start=max(int(config.batch_size) // data, 1))
    results.append({"remat": r, "fsdp": f, "max_batch_per_chip": None if n is None else n * data * accum / num_chips,
                    "compiles": count[0], "seconds": time.perf_counter() - t0})
  return results


def measure_step(compiled, args_fn: Callable[[], tuple], *, runs: int = 5, donates_first: bool = False) -> float:
  """Median wall time of ``compiled(*args)`` over ``runs`` calls after one warm-up (real zeros)."""
  args = args_fn()
  times = []
  for i in range(runs + 1):
    t0 = time.perf_counter()
    out = compiled(*args)
    jax.block_until_ready(out)
    if i:
      times.append(time.perf_counter() - t0)
    if donates_first:  # The train step donates its state: feed the new one back.
      args = (out[0],) + tuple(args[1:])
  return statistics.median(times)


def _zeros(specs: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
  return {k: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding) for k, s in specs.items()}


# --- The input side: what it takes to feed the estimated step. -------------------------------

# Bytes read for one training clip when the config names no shards: one whole record (segment sampling
# parses every stored frame) of a 10-s, 30-fps, 256-px video, as make_shards stores it with every frame
# (frames_per_video=0) and with --frames_per_video=32 (docs/data.md).
REFERENCE_RECORD_BYTES = ((0, 7.81e6), (32, 0.83e6))


def shard_bytes_per_clip(config: ml_collections.ConfigDict) -> tuple[float | None, str]:
  """Bytes read per training clip: the train shards' average record (file bytes / records), and where from.

  One training clip reads one whole record. None (with the reason) when the
  config names no train shards or their record counts are unknown (no
  ``dataset_info.json``): nothing is read to find out.
  """
  data = config.get("data")
  if data is None or data.get("source", "shards") != "shards" or not data.get("train_shards"):
    return None, "the config names no train shards (config.data.train_shards)"
  import tensorflow as tf
  from vfocal_jax.input_pipeline import sources
  try:
    shards = sources.load_shard_set(data.train_shards)
    if not shards.num_examples:
      return None, f"no record counts beside {data.train_shards} (no dataset_info.json)"
    total = sum(tf.io.gfile.stat(f).length for f in shards.files)
  except (OSError, ValueError, tf.errors.OpError) as e:
    return None, f"the train shards could not be listed ({tpu_specs.summarize_error(e, 150)})"
  return total / shards.num_examples, f"average record of the {len(shards.files)} train shard file(s)"


def input_budget(clips_per_second_per_chip: float | None, *, num_chips: int, pipeline_clips_per_core: float | None,
                 bytes_per_clip: float | None, bytes_source: str,
                 host: tpu_specs.HostSpec | None) -> dict[str, Any]:
  """The host cores and storage bandwidth per chip that the estimated train step needs (a pure function).

  ``keeps_up``: the cores needed per chip fit in the TPU VM's vCPUs per chip
  (None when either is unknown). ``reference``: the storage rate for the
  whole records of ``REFERENCE_RECORD_BYTES``, whatever the config's data.
  """
  rate = clips_per_second_per_chip
  cores = rate / pipeline_clips_per_core if rate and pipeline_clips_per_core else None
  per_chip = lambda b: None if rate is None or b is None else rate * b
  out: dict[str, Any] = {
      "clips_per_second_per_chip": rate,
      "clips_per_second": None if rate is None else rate * num_chips,
      "pipeline_clips_per_core": pipeline_clips_per_core,
      "host_cores_per_chip": cores,
      "host": None if host is None else {"machine_type": host.machine_type, "vcpus": host.vcpus, "chips": host.chips,
                                         "vcpus_per_chip": host.vcpus_per_chip, "source": host.source},
      "keeps_up": None if cores is None or host is None else cores <= host.vcpus_per_chip,
      "bytes_per_clip": bytes_per_clip, "bytes_per_clip_source": bytes_source,
      "storage_bytes_per_second_per_chip": per_chip(bytes_per_clip),
      "storage_bytes_per_second": None if per_chip(bytes_per_clip) is None else per_chip(bytes_per_clip) * num_chips,
      "reference": [{"frames_per_video": m, "bytes_per_clip": b, "storage_bytes_per_second_per_chip": per_chip(b)}
                    for m, b in REFERENCE_RECORD_BYTES]}
  return out


def format_input(i: dict[str, Any]) -> list[str]:
  """The report's lines on the input side."""
  rate = i["clips_per_second_per_chip"]
  if rate is None:
    return ["input: no estimated train step time, so no input budget"]
  mb = lambda b: f"{b / 1e6:.3g} MB"
  lines = [f"input: the estimated train step consumes {rate:.1f} clips/s per chip ({i['clips_per_second']:.0f} for "
           "the slice)"]
  host = i["host"]
  vm = ("" if host is None else f"; a {host['machine_type']} TPU VM has {host['vcpus_per_chip']:g} vCPUs per chip "
        f"({host['vcpus']} for {host['chips']} chips, {host['source']})")
  if i["host_cores_per_chip"] is None:
    lines.append("  host cores per chip: unknown (give --pipeline_clips_per_core, the training clips/s per core "
                 f"measured by benchmarks/bench_input_pipeline.py){vm}")
  else:
    verdict = {True: ": keeps up", False: ": DOES NOT keep up", None: ""}[i["keeps_up"]]
    lines.append(f"  host cores per chip: {i['host_cores_per_chip']:.2g} at {i['pipeline_clips_per_core']:g} clips/s "
                 f"per core{vm}{verdict}")
  if i["bytes_per_clip"] is not None:
    lines.append(f"  storage: {mb(i['bytes_per_clip'])} read per clip ({i['bytes_per_clip_source']}) -> "
                 f"{mb(i['storage_bytes_per_second_per_chip'])}/s per chip, {mb(i['storage_bytes_per_second'])}/s "
                 "for the slice")
  else:
    refs = ", ".join(f"{mb(r['bytes_per_clip'])} (frames_per_video={r['frames_per_video']}) -> "
                     f"{mb(r['storage_bytes_per_second_per_chip'])}/s" for r in i["reference"])
    lines.append(f"  storage: bytes per clip unknown ({i['bytes_per_clip_source']}); per chip, for whole records of "
                 f"a 10-s 30-fps 256-px video: {refs}")
  return lines


# --- The report. -----------------------------------------------------------------------------

def _local_capacity(devices: list) -> int | None:
  """Bytes a local accelerator can hold (GPU: ``memory_stats()['bytes_limit']``); None for the CPU."""
  if devices[0].platform == "cpu":
    return None
  try:
    return int(devices[0].memory_stats()["bytes_limit"])
  except Exception:
    return None


def run(config: ml_collections.ConfigDict, *, topology: str | None = None, json_path: str | None = None,
        search_batch: bool = False, measure: bool = False, pipeline_clips_per_core: float | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
  """Compiles the train and eval steps of ``config`` for ``topology``, prints the report and returns it.

  Args:
    config: a config of ``configs/`` (its batch sizes, views, mesh_shape, remat,
      fsdp and dtype are planned as given).
    topology: a Cloud TPU topology (``'v5e:2x2'``, ``'v4:2x2x1'``, ...), compiled
      for on this host with compile-only devices; None or ``'local'``: the devices
      at hand. Set ``JAX_PLATFORMS=cpu`` before JAX starts when planning for a
      topology on a host without that TPU.
    json_path: also write the report there as JSON.
    search_batch: also find the largest train batch per chip that fits, as
      configured and with remat / FSDP turned on (many compiles).
    measure: local devices only: also time each compiled step on zeros.
    pipeline_clips_per_core: the input pipeline's measured training clips/s
      per host core (``benchmarks/bench_input_pipeline.py``): the report's
      ``input`` section then gives the host cores per chip needed.
    log: where the printed report goes.

  Returns:
    The report (JSON-able). Raises ValueError (one line) for an unknown
    topology or a mesh_shape that does not fit its devices; a step that does
    not compile (out of memory, a batch that does not divide) is reported in
    its section (``error``; ``fits`` False for out of memory).
  """
  report, _ = make_report(config, topology=topology, search_batch=search_batch, measure=measure,
                          pipeline_clips_per_core=pipeline_clips_per_core, log=log)
  log(format_report(report))
  if json_path:
    with open(json_path, "w") as f:
      json.dump(report, f, indent=2, sort_keys=True)
    log(f"wrote {json_path}")
  return report


def make_report(config: ml_collections.ConfigDict, *, topology: str | None = None, search_batch: bool = False,
                measure: bool = False, pipeline_clips_per_core: float | None = None, train_only: bool = False,
                log: Callable[[str], None] = print) -> tuple[dict[str, Any], dict[str, Any]]:
  """``run`` without printing: the report and the compile attempts (``compile_steps``) it was read from.

  ``train_only``: compile the train step only (the report's ``eval`` is None).
  """
  if pipeline_clips_per_core is not None and not pipeline_clips_per_core > 0:
    raise ValueError(f"--pipeline_clips_per_core={pipeline_clips_per_core}: must be > 0 (training clips/s per host "
                     "core, as benchmarks/bench_input_pipeline.py prints it).")
  local = topology in (None, "", LOCAL)
  if not local and not os.environ.get("JAX_PLATFORMS") and not jax.config.jax_platforms:
    # Host-side work only (shapes, meshes): never claim this machine's own accelerator (a TPU VM in use).
    jax.config.update("jax_platforms", "cpu")
  devices = target_devices(topology)
  platform, kind = devices[0].platform, devices[0].device_kind
  num_chips, per_chip = tpu_specs.chip_layout(devices)
  chip = tpu_specs.chip_spec(kind) if platform == "tpu" else None
  hbm = chip.hbm_bytes if chip else _local_capacity(devices)
  cfg = target_config(config, platform, len(devices))
  mesh = build_mesh(cfg, devices)
  accum = max(int(cfg.accumulation_steps), 1)
  views = eval_views(cfg)
  report: dict[str, Any] = {
      "topology": LOCAL if local else topology, "platform": platform, "device_kind": kind,
      "num_chips": num_chips, "num_devices": len(devices), "devices_per_chip": per_chip,
      "mesh_shape": [int(mesh.shape[sharding.DATA]), int(mesh.shape[sharding.MODEL])],
      "chip": None if chip is None else {"name": chip.name, "hbm_bytes": chip.hbm_bytes,
                                         "hbm_bytes_per_second": chip.hbm_bytes_per_second,
                                         "peak_bf16_flops": chip.peak_bf16_flops, "source": chip.source},
      "config": {"dataset": cfg.get("dataset"), "variant": cfg.model.get("variant"),
                 "num_frames": int(cfg.num_frames), "image_size": int(cfg.image_size),
                 "dtype": str(cfg.model.get("dtype")), "remat": bool(cfg.model.get("remat", False)),
                 "fsdp": bool(cfg.get("fsdp", False)), "depthwise_impl": _depthwise(cfg),
                 "batch_size": int(cfg.batch_size), "accumulation_steps": accum,
                 "eval_batch_size": int(cfg.eval_batch_size), "eval_views": views},
      "estimates": "compiler cost model" if not local else "compiler cost model, where the backend gives one",
      "unknown": [], "warnings": []}
  steps = compile_steps(cfg, mesh, eval=not train_only)
  common = dict(devices_per_chip=per_chip, chip=chip, hbm_bytes=hbm, num_chips=num_chips)
  b = int(cfg.batch_size) * accum
  report["train"] = analyze(steps["train"], clips=b, videos=b, **common)
  report["eval"] = None if train_only else analyze(
      steps["eval"], clips=int(cfg.eval_batch_size) * views, videos=int(cfg.eval_batch_size), **common)
  bytes_per_clip, bytes_source = shard_bytes_per_clip(cfg)
  report["input"] = input_budget(report["train"]["estimated_clips_per_second_per_chip"], num_chips=num_chips,
                                 pipeline_clips_per_core=pipeline_clips_per_core, bytes_per_clip=bytes_per_clip,
                                 bytes_source=bytes_source, host=tpu_specs.host_spec(chip))
  unknown = report["unknown"]
  if report["mesh_shape"][1] > 1 and report["config"]["depthwise_impl"] == "xla":
    report["warnings"].append(
        "depthwise_impl='xla' with a 'model' axis > 1: XLA's sharded grouped-conv kernel gradient comes out "
        "multiplied by the 'model' axis size (docs/design.md); train with --config.model.depthwise_impl=shift")
  if hbm is None:
    unknown.append(f"memory capacity of a {kind} device (fits is unknown)")
  if chip is None:
    unknown.append(f"peak FLOP/s of a {kind} device (no MFU)")
  for name in ("train", "eval"):
    s = report[name]
    if s is None:
      continue
    if s["ok"] and s["total_bytes_per_chip"] is None:
      unknown.append(f"{name}: part of memory_analysis() on {platform}")
    if s["ok"] and s["estimated_step_seconds"] is None:
      raw = (s["cost_analysis_raw"] or {}).get("optimal_seconds")
      why = f"no optimal_seconds on {platform}" if raw is None else f"unusable optimal_seconds {raw:.4g}"
      unknown.append(f"{name}: the compiler's step-time estimate ({why})")
  if measure:
    if not local:
      unknown.append("measured step time: measure needs the devices at hand (topology=local)")
    else:
      _measure(report, steps, cfg, mesh)
  if search_batch:
    if hbm is None:
      report["search_batch"] = None
      unknown.append("batch search: needs a known memory capacity")
    else:
      log(f"searching the largest train batch per chip on {report['topology']} (one compile per try) ...")
      report["search_batch"] = search_batch_variants(cfg, mesh, hbm_bytes=hbm, devices_per_chip=per_chip,
                                                     num_chips=num_chips, platform=platform, log=log)
  return report, steps


def _depthwise(cfg) -> str:
  """The depthwise implementation the compiled model uses (``target_config`` resolved 'auto')."""
  return resolve_depthwise_impl(cfg.model.depthwise_impl)


def _measure(report, steps, cfg, mesh) -> None:
  trainer = steps["trainer"]
  with mesh:
    if "eval" in steps and steps["eval"]["compiled"] is not None:
      params = trainer.init_state().params
      report["eval"]["measured_step_seconds"] = measure_step(
          steps["eval"]["compiled"], lambda: (params, _zeros(eval_batch_specs(cfg, mesh))))
    if steps["train"]["compiled"] is not None:
      report["train"]["measured_step_seconds"] = measure_step(
          steps["train"]["compiled"], lambda: (trainer.init_state(), _zeros(train_batch_specs(cfg, mesh))),
          donates_first=True)


def _gib(n) -> str:
  if n is None:
    return "?"
  return f"{n / tpu_specs.GiB:.2f} GiB" if n >= tpu_specs.GiB else f"{n / 2 ** 20:.1f} MiB"


def _secs(t) -> str:
  return "?" if t is None else (f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s")


def format_report(r: dict[str, Any]) -> str:
  """The printed report of ``run`` (a pure function of its dict)."""
  c = r["config"]
  lines = [f"plan: {c['dataset']} / {c['variant']}, {c['num_frames']}x{c['image_size']}, {c['dtype']}, remat "
           f"{c['remat']}, fsdp {c['fsdp']}, depthwise {c['depthwise_impl']}",
           f"target: {r['topology']}: {r['num_chips']} chip(s) ({r['device_kind']}), {r['devices_per_chip']} "
           f"device(s) per chip; mesh data={r['mesh_shape'][0]} model={r['mesh_shape'][1]}"]
  chip = r["chip"]
  if chip:
    lines.append(f"chip: {chip['hbm_bytes'] / tpu_specs.GiB:.0f} GiB HBM at {chip['hbm_bytes_per_second'] / 1e9:.0f} "
                 f"GB/s, {chip['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16 peak (published: {chip['source']})")
  if r["platform"] == "tpu":
    lines.append("Every time and FLOP count is the TPU compiler's cost-model estimate: nothing ran on a TPU.")
  for name in ("train", "eval"):
    s = r[name]
    if s is None:
      continue
    what = (f"global batch {s['global_batch']} clips = {s['batch_per_chip']:g} per chip" if name == "train" else
            f"global batch {s['global_batch']} videos x {c['eval_views']} views = {s['clips_per_chip']:g} clips "
            "per chip")
    lines.append(f"{name} step: {what}" + (f" (lowered in {s['lower_seconds']:.0f} s, compiled in "
                                           f"{s['compile_seconds']:.0f} s)" if s["ok"] else ""))
    if not s["ok"]:
      after = f" (after {s['failed_after_seconds']:.0f} s)" if s.get("failed_after_seconds") else ""
      lines.append(f"  does not compile{' (does not fit)' if s['fits'] is False else ''}{after}: {s['error']}")
      continue
    m = s["memory_per_chip"]
    lines.append(f"  memory per chip: arguments {_gib(m['argument'])}, temporaries {_gib(m['temp'])}, outputs "
                 f"{_gib(m['output'])}, aliased {_gib(m['alias'])}, code {_gib(m['generated_code'])}")
    hbm, total = s["hbm_bytes_per_chip"], s["total_bytes_per_chip"]
    verdict = ("unknown capacity" if hbm is None or total is None else
               f"{'fits' if s['fits'] else 'DOES NOT FIT'} ({100 * total / hbm:.0f}% of {_gib(hbm)})")
    lines.append(f"  total {_gib(total)} per chip: {verdict}")
    if s["flops_per_chip"] is not None:
      per_clip = s["flops_per_chip"] / s["clips_per_chip"] if s["clips_per_chip"] else float("nan")
      lines.append(f"  FLOPs per chip per step: {s['flops_per_chip']:.3g} ({per_clip / 1e9:.3g} GFLOP per clip)")
    if s["estimated_step_seconds"] is not None:
      mfu = "" if s["estimated_mfu"] is None else f", MFU {100 * s['estimated_mfu']:.0f}%"
      lines.append(f"  compiler's estimated step time: {_secs(s['estimated_step_seconds'])} -> "
                   f"{s['estimated_clips_per_second_per_chip']:.1f} clips/s per chip{mfu}")
      if s["unmodelled_custom_calls"]:
        calls = ", ".join(f"{n} x {t}" for t, n in s["unmodelled_custom_calls"].items())
        lines.append(f"    (cost model: no cost for {calls}; counted as free, raw optimal_seconds "
                     f"{s['cost_analysis_raw']['optimal_seconds']:.4g})")
    elif s["cost_analysis_raw"] and s["cost_analysis_raw"].get("optimal_seconds") is not None:
      raw = s["cost_analysis_raw"]["optimal_seconds"]
      lines.append(f"  compiler's estimated step time: none (optimal_seconds {raw:.4g})")
    if s["roofline_step_seconds"] is not None:
      lines.append(f"  roofline bound max(FLOPs / peak, bytes accessed / HBM bandwidth): "
                   f"{_secs(s['roofline_step_seconds'])}")
    if s.get("measured_step_seconds") is not None:
      t = s["measured_step_seconds"]
      lines.append(f"  measured step time (median): {_secs(t)} -> {s['clips_per_chip'] / t:.1f} clips/s per chip")
    if s["collectives"]:
      lines.append("  collectives: " + ", ".join(f"{e['kind']} x{e['count']} ({e['bytes'] / 2 ** 20:.1f} MiB)"
                                                  for e in s["collectives"]))
    elif s["collectives"] is not None:
      lines.append("  collectives: none")
    if s.get("traffic"):
      lines.extend("  " + line for line in hlo_traffic.format_breakdown(s["traffic"], "memory traffic",
                                                                         rows=10).splitlines())
  if r.get("input") is not None:
    lines.extend(format_input(r["input"]))
  for v in r.get("search_batch") or []:
    best = "nothing fits" if v["max_batch_per_chip"] is None else f"{v['max_batch_per_chip']:g} clips per chip"
    lines.append(f"largest train batch (remat {v['remat']}, fsdp {v['fsdp']}): {best} "
                 f"({v['compiles']} compiles, {v['seconds']:.0f} s)")
  for u in r["unknown"]:
    lines.append(f"unknown: {u}")
  for w in r.get("warnings", []):
    lines.append(f"warning: {w}")
  return "\n".join(lines)
