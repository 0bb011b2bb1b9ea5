"""``plan``: compile the real train and eval steps for a TPU slice or NVIDIA GPUs on this host, report memory and cost.

    python main.py plan --config=configs/k400_tiny.py --topology=v5e:2x2 [--json=FILE] [--search_batch]
    python main.py plan --config=configs/k400_tiny.py --topology=h100:8    # needs the CUDA plugin, no GPU

The steps are the ones training runs (``train.Trainer``'s jitted step with its
shardings, ``evaluate.make_eval_step`` over every view of a batch), lowered
with abstract inputs on a ``('data', 'model')`` mesh of compile-only devices
(``jax.experimental.topologies``: TPUs from ``libtpu``, GPUs from the CUDA
plugin with ``gpu_specs``' target descriptions; no TPU or GPU needed) and
compiled by that platform's compiler. Per chip (one GPU is one chip): memory
from ``memory_analysis()`` and collectives from the compiled HLO; on a TPU
the FLOPs, bytes and estimated step time (``optimal_seconds``) of
``cost_analysis()``; on a GPU, which has no cost analysis, the FLOPs of the
model's own count (2 x the MACs of the step's matmuls and convolutions, as
``summary`` counts them), the bytes of the compiled program (``hlo_traffic``)
and a roofline bound from the datasheet. ``topology=None``/``'local'`` plans
for the devices at hand and can also time the step (``measure``). The
results are ``plan_report``'s dataclasses (``to_json()`` is the ``--json``
file). See docs/plan.md.
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from vfocal_jax import errors, gpu_specs, hlo_traffic, sharding, tpu_specs
from vfocal_jax.input_budget import format_input, input_budget, shard_bytes_per_clip  # noqa: F401 (re-exported)
from vfocal_jax.models.layers import resolve_depthwise_impl
from vfocal_jax.plan_compile import (  # noqa: F401 (re-exported)
    MAX_BATCH_PER_SHARD, CompileAttempt, CompiledSteps, build_mesh, check_batch, compile_steps, eval_batch_specs,
    eval_views, search_batch_variants, search_largest, target_config, train_batch_specs)
from vfocal_jax.plan_report import BatchSearchResult, Report, StepReport, format_report  # noqa: F401

LOCAL = "local"


# --- Target devices. -------------------------------------------------------------------------

def target_devices(topology: str | None) -> list:
  """The devices to compile for: compile-only TPUs (``'v5e:2x2'``) or GPUs (``'h100:8'``), or the local ones."""
  if topology in (None, "", LOCAL):
    return list(jax.devices())
  if gpu_specs.is_gpu_topology(topology):
    return gpu_specs.devices(topology)
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
    raise errors.FlagError(f"--topology={topology}: no TPU topology of that name could be built "
                           f"({tpu_specs.summarize_error(e, 200)}); e.g. v5e:2x2, v5e:2x4, v4:2x2x1, v5p:2x2x1, "
                           f"v6e:2x2 (needs libtpu), or GPUs: {', '.join(f'{g}:8' for g in gpu_specs.GPUS)} (needs "
                           "the CUDA plugin).") from None


# --- Reading a compiled step. ---------------------------------------------------------------

def analyze(attempt: CompileAttempt, *, devices_per_chip: int, chip, hbm_bytes: int | None, clips: int,
            videos: int, num_chips: int) -> StepReport:
  """The report of one step from its compile attempt (per chip = per device x devices per chip).

  ``chip``: a ``tpu_specs.ChipSpec`` or ``gpu_specs.GpuSpec`` (peak and bandwidth for the roofline), or None.
  Where the compiler gives no FLOPs or bytes (GPUs), the model's FLOPs and the compiled module's traffic stand in.
  """
  k = devices_per_chip
  s = StepReport(ok=attempt.compiled is not None, error=attempt.error, global_batch=videos,
                 batch_per_chip=videos / num_chips, clips_per_chip=clips / num_chips,
                 lower_seconds=attempt.lower_seconds, compile_seconds=attempt.compile_seconds,
                 failed_after_seconds=attempt.failed_after_seconds, hbm_bytes_per_chip=hbm_bytes,
                 fits=False if attempt.oom else None,
                 model_flops_per_chip=None if attempt.model_flops is None else attempt.model_flops / num_chips)
  compiled = attempt.compiled
  if compiled is None:
    return s
  try:
    text = compiled.as_text()
  except Exception:  # No text for this executable.
    text = None
  mem = {key: (None if v is None else v * k) for key, v in tpu_specs.memory_stats(compiled).items()}
  s.total_bytes_per_chip = mem.pop("total")
  s.memory_per_chip = mem
  if s.total_bytes_per_chip is not None and hbm_bytes:
    s.fits = s.total_bytes_per_chip <= hbm_bytes
  per = max(clips / (num_chips * k), 1e-9)  # Clips per device.
  if text is not None:
    s.collectives = tpu_specs.collectives(text)
    s.traffic = hlo_traffic.breakdown(text, per=per)
  cost = tpu_specs.cost_stats(compiled, text)
  if cost["flops"] is None and s.model_flops_per_chip is not None:
    cost["flops"], flops_source = s.model_flops_per_chip / k, "model"
  else:
    flops_source = None if cost["flops"] is None else "compiler"
  bytes_source = None if cost["bytes_accessed"] is None else "compiler"
  if cost["bytes_accessed"] is None and s.traffic is not None:
    cost["bytes_accessed"], bytes_source = s.traffic["bytes"] * per, "hlo"
  for key, value in cost_fields(cost, clips_per_chip=s.clips_per_chip, chip=chip, devices_per_chip=k).items():
    setattr(s, key, value)
  s.flops_source, s.bytes_source = flops_source, bytes_source
  return s


def cost_fields(cost: dict[str, Any], *, clips_per_chip: float, chip, devices_per_chip: int) -> dict[str, Any]:
  """A step's FLOPs, bytes, estimated time, clips/s, MFU and roofline per chip from ``tpu_specs.cost_stats``."""
  k = devices_per_chip
  flops = None if cost["flops"] is None else cost["flops"] * k
  nbytes = None if cost["bytes_accessed"] is None else cost["bytes_accessed"] * k
  t = cost["optimal_seconds"]
  return {"flops_per_chip": flops, "bytes_accessed_per_chip": nbytes,
          "cost_analysis_raw": cost["raw"], "unmodelled_custom_calls": cost["unmodelled"],
          "roofline_step_seconds": tpu_specs.roofline_seconds(flops, nbytes, chip),
          "estimated_step_seconds": t, "estimated_clips_per_second_per_chip": clips_per_chip / t if t else None,
          "estimated_mfu": flops / (t * chip.peak_bf16_flops) if t and chip is not None and flops is not None
                           else None}


# --- Measurement. --------------------------------------------------------------------------

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
        log: Callable[[str], None] = print) -> Report:
  """Compiles the train and eval steps of ``config`` for ``topology``, prints the report and returns it.

  Args:
    config: a config of ``configs/`` (its batch sizes, views, mesh_shape, remat,
      fsdp and dtype are planned as given).
    topology: a Cloud TPU topology (``'v5e:2x2'``, ``'v4:2x2x1'``, ...) or NVIDIA
      GPUs (``'h100:8'``, ``'a100:2x8'`` for 2 hosts of 8: ``gpu_specs.GPUS``),
      compiled for on this host with compile-only devices; None or ``'local'``:
      the devices at hand. Set ``JAX_PLATFORMS=cpu`` before JAX starts when
      planning for a topology on a host without that TPU or GPU (GPUs need it).
    json_path: also write the report there as JSON (``Report.to_json()``).
    search_batch: also find the largest train batch per chip that fits, as
      configured and with remat / FSDP turned on (many compiles).
    measure: local devices only: also time each compiled step on zeros.
    pipeline_clips_per_core: the input pipeline's measured training clips/s
      per host core (``benchmarks/bench_input_pipeline.py``): the report's
      ``input`` section then gives the host cores per chip needed.
    log: where the printed report goes.

  Returns:
    The ``Report``. Raises FlagError (one line) for an unknown topology or a
    mesh_shape that does not fit its devices; a step that does not compile
    (out of memory, a batch that does not divide) is reported in its section
    (``error``; ``fits`` False for out of memory).
  """
  report, _ = make_report(config, topology=topology, search_batch=search_batch, measure=measure,
                          pipeline_clips_per_core=pipeline_clips_per_core, log=log)
  log(format_report(report))
  if json_path:
    with open(json_path, "w") as f:
      json.dump(report.to_json(), f, indent=2, sort_keys=True)
    log(f"wrote {json_path}")
  return report


def _chip(platform: str, kind: str):
  """The published figures of a device kind: ``tpu_specs.ChipSpec``, ``gpu_specs.GpuSpec`` or None."""
  if platform == "tpu":
    return tpu_specs.chip_spec(kind)
  return gpu_specs.gpu_spec(kind) if platform == "gpu" else None


ESTIMATES = {"tpu": "compiler cost model",
             "gpu": "memory and collectives: the compiler's; FLOPs: the model's count; bytes: the compiled "
                    "module's (hlo_traffic); time: roofline bound from the datasheet"}


def make_report(config: ml_collections.ConfigDict, *, topology: str | None = None, search_batch: bool = False,
                measure: bool = False, pipeline_clips_per_core: float | None = None, train_only: bool = False,
                log: Callable[[str], None] = print) -> tuple[Report, CompiledSteps]:
  """``run`` without printing: the report and the compile attempts (``compile_steps``) it was read from.

  ``train_only``: compile the train step only (the report's ``eval`` is None).
  """
  if pipeline_clips_per_core is not None and not pipeline_clips_per_core > 0:
    raise errors.FlagError(f"--pipeline_clips_per_core={pipeline_clips_per_core}: must be > 0 (training clips/s "
                           "per host core, as benchmarks/bench_input_pipeline.py prints it).")
  local = topology in (None, "", LOCAL)
  devices = target_devices(topology)
  platform, kind = devices[0].platform, devices[0].device_kind
  num_chips, per_chip = tpu_specs.chip_layout(devices)
  chip = _chip(platform, kind)
  local_gpu = local and platform == "gpu"  # Its client's limit (75% of the GPU by default), not the datasheet's.
  hbm = chip.hbm_bytes if chip and not local_gpu else _local_capacity(devices)
  cfg = target_config(config, platform, len(devices))
  mesh = build_mesh(cfg, devices)
  accum = max(int(cfg.accumulation_steps), 1)
  views = eval_views(cfg)
  report = Report(
      topology=LOCAL if local else topology, platform=platform, device_kind=kind,
      num_chips=num_chips, num_devices=len(devices), devices_per_chip=per_chip,
      mesh_shape=[int(mesh.shape[sharding.DATA]), int(mesh.shape[sharding.MODEL])],
      chip=None if chip is None else {"name": chip.name, "hbm_bytes": chip.hbm_bytes,
                                      "hbm_bytes_per_second": chip.hbm_bytes_per_second,
                                      "peak_bf16_flops": chip.peak_bf16_flops, "source": chip.source},
      config={"dataset": cfg.get("dataset"), "variant": cfg.model.get("variant"),
              "num_frames": int(cfg.num_frames), "image_size": int(cfg.image_size),
              "dtype": str(cfg.model.get("dtype")), "remat": bool(cfg.model.get("remat", False)),
              "fsdp": bool(cfg.get("fsdp", False)), "depthwise_impl": resolve_depthwise_impl(cfg.model.depthwise_impl),
              "batch_size": int(cfg.batch_size), "accumulation_steps": accum,
              "eval_batch_size": int(cfg.eval_batch_size), "eval_views": views},
      estimates=(ESTIMATES.get(platform, "compiler cost model") if not local else
                 "compiler cost model, where the backend gives one"))
  steps = compile_steps(cfg, mesh, eval=not train_only)
  common = dict(devices_per_chip=per_chip, chip=chip, hbm_bytes=hbm, num_chips=num_chips)
  b = int(cfg.batch_size) * accum
  report.train = analyze(steps.train, clips=b, videos=b, **common)
  if not train_only:
    report.eval = analyze(steps.eval, clips=int(cfg.eval_batch_size) * views, videos=int(cfg.eval_batch_size),
                          **common)
  bytes_per_clip, bytes_source = shard_bytes_per_clip(cfg)
  report.input = input_budget(report.train.estimated_clips_per_second_per_chip, num_chips=num_chips,
                              pipeline_clips_per_core=pipeline_clips_per_core, bytes_per_clip=bytes_per_clip,
                              bytes_source=bytes_source, host=tpu_specs.host_spec(chip) if platform == "tpu" else None)
  _notes(report, hbm=hbm, chip=chip)
  if measure:
    if not local:
      report.unknown.append("measured step time: measure needs the devices at hand (topology=local)")
    else:
      _measure(report, steps, cfg, mesh)
  if search_batch:
    report.searched = True
    if hbm is None:
      report.unknown.append("batch search: needs a known memory capacity")
    else:
      log(f"searching the largest train batch per chip on {report.topology} (one compile per try) ...")
      report.search_batch = search_batch_variants(cfg, mesh, hbm_bytes=hbm, devices_per_chip=per_chip,
                                                  num_chips=num_chips, platform=platform, log=log)
  return report, steps


def _notes(report: Report, *, hbm: int | None, chip) -> None:
  """The report's ``unknown`` and ``warnings``: what could not be read, and what to watch for."""
  platform, kind, unknown = report.platform, report.device_kind, report.unknown
  if report.mesh_shape[1] > 1 and report.config["depthwise_impl"] == "xla":
    report.warnings.append(
        "depthwise_impl='xla' with a 'model' axis > 1: XLA's sharded grouped-conv kernel gradient comes out "
        "multiplied by the 'model' axis size (docs/design.md); train with --config.model.depthwise_impl=shift")
  if hbm is None:
    unknown.append(f"memory capacity of a {kind} device (fits is unknown)")
  if chip is None:
    unknown.append(f"peak FLOP/s of a {kind} device (no MFU)")
  for name in ("train", "eval"):
    s = getattr(report, name)
    if s is None or not s.ok:
      continue
    if s.total_bytes_per_chip is None:
      unknown.append(f"{name}: part of memory_analysis() on {platform}")
    elif platform == "gpu" and hbm and s.total_bytes_per_chip > gpu_specs.DEFAULT_MEM_FRACTION * hbm:
      report.warnings.append(
          f"{name}: {100 * s.total_bytes_per_chip / hbm:.0f}% of the GPU's memory: more than the "
          f"{100 * gpu_specs.DEFAULT_MEM_FRACTION:.0f}% JAX takes by default; run with "
          "XLA_PYTHON_CLIENT_MEM_FRACTION=.95 (docs/plan.md)")
    if s.estimated_step_seconds is None:
      raw = (s.cost_analysis_raw or {}).get("optimal_seconds")
      why = f"no optimal_seconds on {platform}" if raw is None else f"unusable optimal_seconds {raw:.4g}"
      unknown.append(f"{name}: the compiler's step-time estimate ({why})")


def _measure(report: Report, steps: CompiledSteps, cfg, mesh) -> None:
  trainer = steps.trainer
  with mesh:
    if steps.eval is not None and steps.eval.compiled is not None:
      params = trainer.init_state().params
      report.eval.measured_step_seconds = measure_step(
          steps.eval.compiled, lambda: (params, _zeros(eval_batch_specs(cfg, mesh))))
    if steps.train.compiled is not None:
      report.train.measured_step_seconds = measure_step(
          steps.train.compiled, lambda: (trainer.init_state(), _zeros(train_batch_specs(cfg, mesh))),
          donates_first=True)
