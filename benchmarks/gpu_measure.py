"""Measured vs compiled on a local GPU: T's train and eval steps, `plan --topology=local --measure`.

    python benchmarks/gpu_measure.py [--clips_per_gpu=8] [--videos_per_gpu=1] [--set model.focal_projection=split_spatial]

For each step: the measured step time (median of `plan`'s timed calls on zeros),
the compiled program's FLOPs and bytes per GPU (XLA's `cost_analysis` where
the GPU compiler gives it, else the model's FLOPs and the HLO's bytes), the
roofline bound those set at the GPU's datasheet peak and bandwidth
(`gpu_specs`), and what the measurement achieved of each: MFU, and the
bytes per second the program's bytes imply. A measured time far above the
roofline with low achieved bandwidth says the bound is latency or launch
overhead, not HBM. Issue 20, item 5: prepared for a GPU machine, one call.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="k400_tiny")
  parser.add_argument("--clips_per_gpu", type=int, default=8)
  parser.add_argument("--videos_per_gpu", type=int, default=1, help="eval videos (x their views) per GPU")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a config field; repeatable")
  parser.add_argument("--json", default=None, help="also write the report as JSON here")
  args = parser.parse_args()

  import importlib
  import json

  import jax

  from vfocal_jax import config_fields, plan

  n = jax.local_device_count()
  config = importlib.import_module(f"vfocal_jax.configs.{args.config}").get_config()
  fields = {"batch_size": args.clips_per_gpu * n, "eval_batch_size": args.videos_per_gpu * n}
  for item in args.set:
    key, value = item.split("=", 1)
    current = config_fields.get(config, key)
    fields[key] = type(current)(value) if isinstance(current, (int, float)) and not isinstance(current, bool) \
        else {"True": True, "False": False}.get(value, value)
  config = config_fields.updated(config, fields)
  report, _ = plan.make_report(config, topology="local", measure=True, log=lambda s: None)
  print(f"{report.device_kind} x {n}, {args.config} {' '.join(args.set)}")
  print(f"{'step':6} {'batch/GPU':>9} {'measured ms':>11} {'roofline ms':>11} {'GFLOP':>8} {'GB':>7} "
        f"{'MFU':>6} {'GB/s':>7} {'memory GiB':>10}")
  for name in ("train", "eval"):
    s = getattr(report, name)
    if s is None or not s.ok:
      print(f"{name:6} failed: {None if s is None else s.error}")
      continue
    t = s.measured_step_seconds
    flops, nbytes = s.flops_per_chip or 0.0, s.bytes_accessed_per_chip or 0.0
    peak = (report.chip or {}).get("peak_bf16_flops")
    mfu = f"{100 * s.model_flops_per_chip / t / peak:5.1f}%" if t and s.model_flops_per_chip and peak else "n/a"
    print(f"{name:6} {s.batch_per_chip:9g} {1e3 * t if t else float('nan'):11.1f} "
          f"{1e3 * (s.roofline_step_seconds or float('nan')):11.1f} {flops / 1e9:8.1f} {nbytes / 1e9:7.2f} {mfu:>6} "
          f"{nbytes / t / 1e9 if t else float('nan'):7.0f} {(s.total_bytes_per_chip or 0) / 2 ** 30:10.2f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report.to_json(), f, indent=1)


if __name__ == "__main__":
  main()
