r"""Throughput and latency of the eval forward and the train step, T / S / B over batch sizes.

    .venv/bin/python benchmarks/throughput.py [--variants=tiny,small,base] [--batch_sizes=1,2,4,8] \
        [--modes=eval,train] [--dtype=bfloat16|float32] [--frames=8] [--size=224] [--rounds=10] \
        [--output_json=throughput.json] [--output_csv=throughput.csv]
    .venv/bin/python benchmarks/throughput.py --tiny    # seconds, for tests and smoke checks

The same script runs on CPU, GPU and TPU unchanged: it uses whatever
`jax.devices()` returns, with the project's own compiled steps over a mesh of
all local devices (`vfocal_jax.evaluate.make_eval_step`,
`vfocal_jax.train.Trainer.train_step`: mixup/CutMix, label smoothing, SGD
Nesterov, gradient clipping, as in training). The batch is the global batch
(it must divide over the devices).

For each (variant, mode, batch size):
* compile_s: `lower(...).compile()` wall time;
* latency_ms: median (and p90) wall time of one call after `--warmup` calls,
  with `block_until_ready`; clips_per_s = batch / median (a train clip is
  one clip of the global batch; an eval clip is one view);
* xla_gflop: XLA's `cost_analysis()` flops of the compiled step (2 per
  multiply-add, skipped padded taps, element-wise work counted: not the
  paper's GMACs; see `python main.py summary`), and achieved_tflops =
  xla_gflop / median;
* peak_fraction: achieved_tflops / the accelerator's dense peak for `--dtype`
  (table below, by `device_kind`) or, on CPU, the float32 peak of the visible
  cores from /proc/cpuinfo (`bench_vs_pytorch.cpu_peak_gflops`); empty when
  the device is unknown;
* xla_mem_mb: the compiled step's arguments + outputs + temporaries
  (`memory_analysis()`, minus donated aliases): what the step needs on the
  device; device_peak_mb: the device allocator's peak so far
  (`memory_stats()['peak_bytes_in_use']`, GPU/TPU only; it never goes down,
  so rows are run from the smallest batch up); rss_peak_mb: the process's
  peak resident memory so far (host).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import platform
import resource
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# Dense peak TFLOP/s by device kind (substring of `device_kind`, lower case) and compute dtype,
# from the vendors' data sheets (no sparsity). float32 on NVIDIA tensor cores is TF32, which is
# what XLA uses for float32 matmuls/convolutions at default precision.
ACCELERATOR_PEAK_TFLOPS = {
    "h200": {"bfloat16": 989.0, "float32": 494.0},
    "h100": {"bfloat16": 989.0, "float32": 494.0},  # SXM; PCIe is lower (756 / 378).
    "a100": {"bfloat16": 312.0, "float32": 156.0},
    "l4": {"bfloat16": 121.0, "float32": 60.0},
    "tpu v6": {"bfloat16": 918.0, "float32": 918.0},
    "tpu v5p": {"bfloat16": 459.0, "float32": 459.0},
    "tpu v5 lite": {"bfloat16": 197.0, "float32": 197.0},
    "tpu v5e": {"bfloat16": 197.0, "float32": 197.0},
    "tpu v4": {"bfloat16": 275.0, "float32": 275.0},
}

TINY_MODEL = dict(embed_dim=8, depths=(1, 1, 1, 1), focal_levels=(1, 1, 1, 1), focal_windows=(3, 3, 3, 3))


def device_peak_tflops(device: Any, dtype: str) -> tuple[float | None, str]:
  """Dense peak of `device` (all local devices of its kind count: times their number) and its source."""
  import jax  # pylint: disable=import-outside-toplevel
  kind = device.device_kind.lower()
  n = jax.local_device_count()
  if device.platform == "cpu":
    from benchmarks.bench_vs_pytorch import cpu_peak_gflops  # pylint: disable=import-outside-toplevel
    peak, how = cpu_peak_gflops()
    if peak != peak:  # NaN: no clock speed in /proc/cpuinfo.
      return None, how
    return peak / 1e3, "float32 peak of the visible cores: " + how
  for key, peaks in ACCELERATOR_PEAK_TFLOPS.items():
    if key in kind:
      return peaks[dtype] * n, f"{n} x {device.device_kind} dense {dtype} peak {peaks[dtype]:.0f} TFLOP/s"
  return None, f"unknown peak for {device.device_kind!r}"


def _cost_flops(compiled: Any) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  try:
    return float(cost["flops"])
  except (KeyError, TypeError):
    return None


def _memory_mb(compiled: Any) -> float | None:
  try:
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    return total / 2 ** 20
  except Exception:  # Not every backend reports it.  pylint: disable=broad-except
    return None


def _device_peak_mb() -> float | None:
  import jax  # pylint: disable=import-outside-toplevel
  peaks = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(stats["peak_bytes_in_use"])
  return max(peaks) / 2 ** 20 if peaks else None


def _rss_peak_mb() -> float:
  scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2 ** 20


def make_config(variant: str, *, batch: int, frames: int, size: int, num_classes: int, dtype: str,
                model_overrides: dict[str, Any] | None = None):
  """The official recipe's config with the benchmark's model, clip and batch."""
  from vfocal_jax.configs import default  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.num_frames = frames
  config.image_size = size
  config.batch_size = batch
  config.eval_batch_size = batch
  config.accumulation_steps = 1
  config.model.variant = variant
  config.model.num_classes = num_classes
  config.model.dtype = dtype
  for key, value in (model_overrides or {}).items():
    config.model[key] = value
  config.num_train_steps = 1000
  config.warmup_steps = 10
  config.num_train_examples = 1000 * batch
  return config


def _time_calls(call, rounds: int, warmup: int) -> list[float]:
  for _ in range(warmup):
    call()
  times = []
  for _ in range(rounds):
    t = time.perf_counter()
    call()
    times.append(time.perf_counter() - t)
  return times


_STATES: dict[tuple, Any] = {}


def _initial_state(trainer, key: tuple) -> Any:
  """The train state of `trainer`, initialised once per model (the init compiles for seconds)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  if key not in _STATES:
    _STATES.clear()  # Keep one model's state on the host at a time.
    _STATES[key] = jax.tree.map(np.asarray, trainer.init_state())
  return jax.device_put(_STATES[key], trainer.state_sharding)


def bench_one(variant: str, mode: str, batch: int, *, frames: int, size: int, num_classes: int, dtype: str,
              rounds: int, warmup: int, model_overrides: dict[str, Any] | None = None,
              num_devices: int = 0) -> dict[str, Any]:
  """Compiles and times one step over the first `num_devices` devices (0: all); returns a row."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from vfocal_jax import evaluate, pixels, sharding, train  # pylint: disable=import-outside-toplevel
  config = make_config(variant, batch=batch, frames=frames, size=size, num_classes=num_classes, dtype=dtype,
                       model_overrides=model_overrides)
  devices = jax.devices()[:num_devices] if num_devices > 0 else jax.devices()
  if batch % len(devices):
    raise ValueError(f"batch {batch} does not divide over {len(devices)} devices")
  mesh = sharding.create_mesh((len(devices), 1), devices=devices)
  trainer = train.Trainer(config, steps_per_epoch=1000, mesh=mesh)
  rng = np.random.default_rng(0)
  video = rng.integers(0, 256, (batch, frames, size, size, 3), dtype=np.uint8)   # as the pipeline yields
  labels = rng.integers(0, num_classes, batch).astype(np.int32)
  with trainer.mesh:
    state = _initial_state(trainer, (variant, frames, size, num_classes, dtype, len(devices)))
    if mode == "train":
      args = (state, trainer.put_batch(pixels.with_pixel_affine({"video": video, "label": labels})))
      t = time.perf_counter()
      compiled = trainer.train_step.lower(*args).compile()
      compile_s = time.perf_counter() - t
      holder = {"state": state}
      batch_arrays = args[1]

      def call():
        holder["state"], metrics = compiled(holder["state"], batch_arrays)
        jax.block_until_ready((holder["state"].params, metrics))
    elif mode == "eval":
      params = state.params
      step = evaluate.make_eval_step(trainer.model, num_classes, trainer.mesh,
                                     jax.tree.map(lambda x: x.sharding, params))
      arrays = sharding.global_batch(pixels.with_pixel_affine(
          {"video": video[:, None], "label": labels, "mask": np.ones(batch, bool)}), trainer.mesh)
      t = time.perf_counter()
      compiled = step.lower(params, arrays).compile()
      compile_s = time.perf_counter() - t

      def call():
        jax.block_until_ready(compiled(params, arrays))
    else:
      raise ValueError(f"mode {mode!r}: expected eval or train")
    times = _time_calls(call, rounds, warmup)
  median = statistics.median(times)
  flops = _cost_flops(compiled)
  device = jax.devices()[0]
  peak, peak_source = device_peak_tflops(device, dtype)
  achieved = flops / median / 1e12 if flops else None
  return {
      "variant": variant, "mode": mode, "batch": batch, "dtype": dtype, "frames": frames, "size": size,
      "compile_s": compile_s,
      "latency_ms": 1e3 * median,
      "latency_p90_ms": 1e3 * float(np.percentile(times, 90)),
      "clips_per_s": batch / median,
      "xla_gflop": flops / 1e9 if flops else None,
      "achieved_tflops": achieved,
      "peak_fraction": achieved / peak if achieved and peak else None,
      "peak_tflops": peak, "peak_source": peak_source,
      "xla_mem_mb": _memory_mb(compiled),
      "device_peak_mb": _device_peak_mb(),
      "rss_peak_mb": _rss_peak_mb(),
      "rounds": rounds, "platform": device.platform, "device_kind": device.device_kind,
      "num_devices": len(devices),
  }


COLUMNS = ("variant", "mode", "batch", "dtype", "compile_s", "latency_ms", "latency_p90_ms", "clips_per_s",
           "xla_gflop", "achieved_tflops", "peak_fraction", "xla_mem_mb", "device_peak_mb", "rss_peak_mb")


def format_table(rows: list[dict[str, Any]]) -> str:
  """A fixed-width text table of the main columns."""
  def cell(v):
    if v is None:
      return "-"
    if isinstance(v, float):
      return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)
  table = [list(COLUMNS)] + [[cell(r.get(c)) for c in COLUMNS] for r in rows]
  widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
  return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variants", default="tiny,small,base", help="comma-separated: tiny,small,base")
  p.add_argument("--batch_sizes", default="1,2,4,8", help="global clips per step, comma-separated")
  p.add_argument("--modes", default="eval,train", help="eval,train")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="compute dtype")
  p.add_argument("--frames", type=int, default=8)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--num_classes", type=int, default=400)
  p.add_argument("--rounds", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--num_devices", type=int, default=0, help="use the first N devices (0: all local ones)")
  p.add_argument("--tiny", action="store_true",
                 help="a 4-block, 8-wide model on 2 x 32 x 32 clips, batches 1,2, 2 rounds: runs in seconds")
  p.add_argument("--output_json", default="", help="write the rows (and the machine) here")
  p.add_argument("--output_csv", default="", help="write the rows here")
  args = p.parse_args(argv)
  if args.tiny:
    args.variants, args.frames, args.size, args.num_classes = "custom", 2, 32, 5
    args.batch_sizes = args.batch_sizes if args.batch_sizes != "1,2,4,8" else "1,2"
    args.rounds, args.warmup = min(args.rounds, 2), min(args.warmup, 1)
  return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  import jax  # pylint: disable=import-outside-toplevel
  overrides = TINY_MODEL if args.tiny else None
  batches = sorted(int(b) for b in args.batch_sizes.split(",") if b)
  rows = []
  print(f"devices: {args.num_devices or jax.device_count()} of {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"jax {jax.__version__}; {args.frames} x {args.size} x {args.size} clips, {args.dtype}")
  for variant in [v for v in args.variants.split(",") if v]:
    for mode in [m for m in args.modes.split(",") if m]:
      for batch in batches:
        try:
          row = bench_one(variant, mode, batch, frames=args.frames, size=args.size, num_classes=args.num_classes,
                          dtype=args.dtype, rounds=args.rounds, warmup=args.warmup, model_overrides=overrides,
                          num_devices=args.num_devices)
        except Exception as e:  # Out of memory at a big batch: record it, go on.  pylint: disable=broad-except
          msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
          print(f"  {variant} {mode} batch {batch}: FAILED {msg}", file=sys.stderr)
          row = {"variant": variant, "mode": mode, "batch": batch, "dtype": args.dtype, "error": msg}
        rows.append(row)
        print(f"  {variant:>6s} {mode:>5s} batch {batch:>3d}: "
              + (f"{row['clips_per_s']:.2f} clips/s, {row['latency_ms']:.1f} ms, compile {row['compile_s']:.1f} s"
                 if "error" not in row else "failed"), flush=True)
  print()
  print(format_table(rows))
  good = [r for r in rows if "peak_source" in r]
  if good:
    print(f"\npeak used for peak_fraction: {good[0]['peak_source']}")
  if args.output_json:
    meta = {"argv": sys.argv[1:] if argv is None else argv, "jax": jax.__version__,
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "python": platform.python_version(), "host": platform.node(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
    with open(args.output_json, "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"wrote {args.output_json}")
  if args.output_csv:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    os.makedirs(os.path.dirname(os.path.abspath(args.output_csv)), exist_ok=True)
    with open(args.output_csv, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=keys)
      writer.writeheader()
      writer.writerows(rows)
    print(f"wrote {args.output_csv}")
  return rows


if __name__ == "__main__":
  main()
