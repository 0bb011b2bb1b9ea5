"""The docs/plan.md tables: ``plan`` for the official recipes on a few Cloud TPU slices and GPUs, compiled here.

    JAX_PLATFORMS=cpu python benchmarks/plan_table.py --rows=tiny@v5e:2x2,small@v5e:2x2 --out_dir=/tmp/plan_rows
    python benchmarks/plan_table.py --out_dir=/tmp/plan_rows --table_only   # print the table of the rows done
    JAX_PLATFORMS=cpu python benchmarks/plan_table.py --rows=tiny@h100:8,tiny@a100:8   # GPUs: needs jax[cuda12]
    python benchmarks/plan_table.py --weak=a.json,b.json   # weak-scaling table of `plan --json` reports
    python benchmarks/plan_table.py --weak_topologies=v5e:2x2,v5e:4x4 --weak_config=demo --clips_per_chip=8 \
        --set=image_size=224 --set=model.dtype=bfloat16 --out_dir=/tmp/weak   # train step only, same clips/chip

Each row (recipe @ topology) is one ``plan.run`` (train + eval compile, each
taking minutes for the full-size models) and is saved as ``out_dir/<row>.json``,
so rows can be run one at a time (in the background) and the table printed
from whatever is there. ``--search_batch`` adds the largest batch per chip
(many more compiles). Every TPU figure is the TPU compiler's estimate: no TPU runs. GPU rows (``h100:8``, ...)
get their own table: the model's FLOPs, the compiled module's bytes and the roofline bound (docs/plan.md).
"""
from __future__ import annotations

import argparse
import ast
import glob
import gzip
import json
import os
import sys
import types

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

RECIPES = {"tiny": "k400_tiny", "small": "k400_small", "base": "k400_base"}
DEFAULT_ROWS = ("tiny@v5e:2x2", "tiny@v5e:2x4", "tiny@v4:2x2x1", "tiny@v5p:2x2x1", "small@v5e:2x2", "base@v5e:2x2")


def row_name(row: str) -> str:
  return row.replace("@", "_").replace(":", "_")


def run_row(row: str, out_dir: str, search_batch: bool) -> dict:
  import importlib
  from vfocal_jax import plan
  recipe, topology = row.split("@")
  config = importlib.import_module(f"configs.{RECIPES[recipe]}").get_config()
  report, steps = plan.make_report(config, topology=topology, search_batch=search_batch)
  print(plan.format_report(report), flush=True)
  report = report.to_json()
  report["row"] = row
  with open(os.path.join(out_dir, row_name(row) + ".json"), "w") as f:
    json.dump(report, f, indent=2, sort_keys=True)
  for name in ("train", "eval"):  # The compiled modules, to read again without recompiling.
    attempt = getattr(steps, name)
    if attempt is not None and attempt.compiled is not None:
      with gzip.open(os.path.join(out_dir, f"{row_name(row)}_{name}.hlo.txt.gz"), "wt") as f:
        f.write(attempt.compiled.as_text())
  return report


def reanalyze(report: dict, out_dir: str) -> dict:
  """Recomputes the cost-derived figures of a saved row from its raw cost analysis and saved HLO (no compile)."""
  from vfocal_jax import plan, tpu_specs
  chip = tpu_specs.chip_spec(report["device_kind"])
  for name in ("train", "eval"):
    s, path = report[name], os.path.join(out_dir, f"{row_name(report['row'])}_{name}.hlo.txt.gz")
    raw = s.get("cost_analysis_raw")
    if not raw or raw.get("flops") is None or not os.path.exists(path):  # GPU rows: no cost analysis to re-read.
      continue
    ca = {"flops": raw["flops"], "bytes accessed": raw["bytes_accessed"], "transcendentals": raw["transcendentals"],
          "optimal_seconds": raw["optimal_seconds"]}
    with gzip.open(path, "rt") as f:
      text = f.read()
    cost = tpu_specs.cost_stats(types.SimpleNamespace(cost_analysis=lambda ca=ca: ca), text)
    s.update(plan.cost_fields(cost, clips_per_chip=s["clips_per_chip"], chip=chip,
                              devices_per_chip=report["devices_per_chip"]))
  return report


def _f(x, fmt, missing="-"):
  return missing if x is None else format(x, fmt)


def table(reports: list[dict]) -> str:
  """Markdown table, one line per (recipe, topology, step)."""
  head = ("| recipe | topology (chips) | step | batch / chip | memory / chip (GiB) | HBM (GiB) | fits | "
          "max train batch / chip | est. step | est. clips/s/chip | est. MFU | TFLOP / chip / step | compile here |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in reports:
    c = r["config"]
    searched = {(v["remat"], v["fsdp"]): v["max_batch_per_chip"] for v in r.get("search_batch") or []}
    for name in ("train", "eval"):
      s = r[name]
      best = "-"
      if name == "train" and searched:
        best = "; ".join(f"{'remat ' if k[0] else ''}{'fsdp ' if k[1] else ''}{_f(v, 'g', 'none')}".strip()
                         for k, v in searched.items())
      gib = lambda b: None if b is None else b / 2 ** 30
      compile_s = (s["lower_seconds"] or 0) + (s["compile_seconds"] or 0) if s["ok"] else None
      batch = f"{s['batch_per_chip']:g}" + ("" if name == "train" else f" x {c['eval_views']} views")
      fits = {True: "yes", False: "NO", None: "?"}[s["fits"]]
      ms = None if s["estimated_step_seconds"] is None else f"{1e3 * s['estimated_step_seconds']:.0f} ms"
      mfu = None if s["estimated_mfu"] is None else f"{100 * s['estimated_mfu']:.0f}%"
      tflop = None if s["flops_per_chip"] is None else s["flops_per_chip"] / 1e12
      minutes = None if compile_s is None else f"{compile_s / 60:.1f} min"
      lines.append(
          f"| {c['variant']} {c['num_frames']}x{c['image_size']} {c['dtype']} | {r['topology']} ({r['num_chips']}) | "
          f"{name} | {batch} | {_f(gib(s['total_bytes_per_chip']), '.2f')} | "
          f"{_f(gib(s['hbm_bytes_per_chip']), '.0f')} | "
          f"{fits} | {best} | {_f(ms, 's')} | {_f(s['estimated_clips_per_second_per_chip'], '.1f')} | {_f(mfu, 's')} | "
          f"{_f(tflop, '.2f')} | {_f(minutes, 's')} |")
  return "\n".join(lines)


def gpu_table(reports: list[dict]) -> str:
  """Markdown table of GPU rows: memory, the model's FLOPs, the compiled module's bytes, the roofline bound."""
  head = ("| recipe | GPUs | step | batch / GPU | memory / GPU (GiB) | GPU memory (GiB) | fits | TFLOP / GPU / step "
          "(model) | GB / GPU / step (HLO) | roofline bound | bound by | clips/s/GPU at the bound | collectives per "
          "GPU | compile here |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in reports:
    c, chip = r["config"], r["chip"] or {}
    for name in ("train", "eval"):
      s = r[name]
      if s is None:
        continue
      batch = f"{s['batch_per_chip']:g}" + ("" if name == "train" else f" x {c['eval_views']} views")
      if not s["ok"]:
        lines.append(f"| {c['variant']} {c['num_frames']}x{c['image_size']} {c['dtype']} | {r['topology']} | {name} | "
                     f"{batch} | does not compile: {s['error']} | | | | | | | | | |")
        continue
      t, flops, nbytes = s["roofline_step_seconds"], s["flops_per_chip"], s["bytes_accessed_per_chip"]
      bound = "-"
      if t and flops is not None and nbytes is not None and chip:
        bound = "compute" if flops / chip["peak_bf16_flops"] >= nbytes / chip["hbm_bytes_per_second"] else "memory"
      coll = ", ".join(f"{e['kind']} x{e['count']} {_size(e['bytes'])}" for e in s["collectives"] or []) or "none"
      compile_s = (s["lower_seconds"] or 0) + (s["compile_seconds"] or 0)
      gib = lambda b: None if b is None else b / 2 ** 30
      fits = {True: "yes", False: "NO", None: "?"}[s["fits"]]
      lines.append(
          f"| {c['variant']} {c['num_frames']}x{c['image_size']} {c['dtype']} | {r['topology']} | {name} | {batch} | "
          f"{_f(gib(s['total_bytes_per_chip']), '.2f')} | {_f(gib(s['hbm_bytes_per_chip']), '.2f')} | "
          f"{fits} | {_f(None if flops is None else flops / 1e12, '.2f')} | "
          f"{_f(None if nbytes is None else nbytes / 1e9, '.1f')} | {_f(None if t is None else 1e3 * t, '.1f')} ms | "
          f"{bound} | {_f(s['clips_per_chip'] / t if t else None, '.0f')} | {coll} | {compile_s / 60:.1f} min |")
  return "\n".join(lines)


def _size(n: float) -> str:
  for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if n >= scale:
      return f"{n / scale:.3g} {unit}"
  return f"{n:g} B"


def weak_table(reports: list[dict]) -> str:
  """Markdown weak-scaling table: one line per report (same config, same batch per chip, growing slices)."""
  head = ("| slice | chips | clips / chip | train-step collectives per chip | memory / chip | est. step | "
          "est. clips/s/chip | vs first |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  first = None
  for r in sorted(reports, key=lambda r: r["num_chips"]):
    s = r["train"]
    if not s["ok"]:
      lines.append(f"| {r['topology']} | {r['num_chips']} | {s['batch_per_chip']:g} | does not compile: {s['error']} |"
                   " | | | |")
      continue
    coll = ", ".join(f"{e['kind']} x{e['count']} {_size(e['bytes'])}" for e in s["collectives"] or [])
    t, mem = s["estimated_step_seconds"], s["total_bytes_per_chip"]
    first = first or (t, mem)
    ratio = f"step x{t / first[0]:.3f}, memory x{mem / first[1]:.3f}" if t and first[0] else "-"
    lines.append(f"| {r['topology']} | {r['num_chips']} | {s['batch_per_chip']:g} | {coll or 'none'} | "
                 f"{_size(mem)} | {_f(None if t is None else 1e3 * t, '.4g')} ms | "
                 f"{_f(s['estimated_clips_per_second_per_chip'], '.1f')} | {ratio} |")
  return "\n".join(lines)


def _parse(value: str, current):
  """A ``--set`` value as the type of the field it overrides (a Python literal, else the string)."""
  try:
    parsed = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    parsed = value
  if isinstance(current, (tuple, list)):
    return type(current)(parsed)
  if isinstance(current, float) and isinstance(parsed, int):
    return float(parsed)
  return parsed


def run_weak(config_name: str, topologies: list[str], clips_per_chip: int, overrides: list[str],
             out_dir: str) -> list[dict]:
  """``plan`` of the train step only, for one config at ``clips_per_chip`` on each topology; one JSON each."""
  import importlib
  from vfocal_jax import config_fields, plan
  reports = []
  for topology in topologies:
    config = importlib.import_module(f"configs.{config_name}").get_config()
    for item in overrides:
      key, value = item.split("=", 1)
      config_fields.set_(config, key, _parse(value, config_fields.get(config, key)))
    devices = plan.target_devices(topology)
    chips, _ = plan.tpu_specs.chip_layout(devices)
    config.batch_size = clips_per_chip * chips // max(int(config.accumulation_steps), 1)
    report, _ = plan.make_report(config, topology=topology, train_only=True)
    print(plan.format_report(report), flush=True)
    path = os.path.join(out_dir, f"weak_{config_name}_{row_name(topology)}.json")
    with open(path, "w") as f:
      json.dump(report, f, indent=2, sort_keys=True)
    reports.append(report)
  return reports


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="recipe@topology, comma-separated.")
  parser.add_argument("--out_dir", default=os.path.join(ROOT, "workdir_plan"), help="One JSON per row.")
  parser.add_argument("--search_batch", action="store_true", help="Also search the largest batch per chip.")
  parser.add_argument("--table_only", action="store_true", help="Print the table of the rows in out_dir.")
  parser.add_argument("--reanalyze", action="store_true",
                      help="With --table_only: recompute the cost figures of the saved rows from their raw cost "
                           "analysis and HLO (after a change to how they are read), and save them.")
  parser.add_argument("--weak", default="",
                      help="Comma-separated plan --json reports of one config on growing slices (same batch per "
                           "chip): print their weak-scaling table and stop.")
  parser.add_argument("--weak_topologies", default="",
                      help="Comma-separated topologies: plan the train step of --weak_config at --clips_per_chip on "
                           "each (JSON in --out_dir), then print the weak-scaling table.")
  parser.add_argument("--weak_config", default="demo", help="A module of configs/ for --weak_topologies.")
  parser.add_argument("--clips_per_chip", type=int, default=8)
  parser.add_argument("--set", action="append", default=[], help="FIELD=VALUE config override (repeatable).")
  args = parser.parse_args()
  if args.weak_topologies:
    os.makedirs(args.out_dir, exist_ok=True)
    print(weak_table(run_weak(args.weak_config, args.weak_topologies.split(","), args.clips_per_chip, args.set,
                              args.out_dir)))
    return
  if args.weak:
    reports = []
    for path in args.weak.split(","):
      with open(path) as f:
        reports.append(json.load(f))
    print(weak_table(reports))
    return
  os.makedirs(args.out_dir, exist_ok=True)
  if not args.table_only:
    for row in filter(None, args.rows.split(",")):
      run_row(row, args.out_dir, args.search_batch)
  reports = []
  for path in sorted(glob.glob(os.path.join(args.out_dir, "*.json"))):
    with open(path) as f:
      report = json.load(f)
    if args.reanalyze and "row" in report:
      from vfocal_jax import plan
      report = reanalyze(report, args.out_dir)
      with open(path, "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
      print(plan.format_report(report), "\n")
    reports.append(report)
  tpu, gpu = [r for r in reports if r["platform"] != "gpu"], [r for r in reports if r["platform"] == "gpu"]
  if tpu:
    print(table(tpu))
  if gpu:
    print(gpu_table(gpu))


if __name__ == "__main__":
  main()
