"""Before/after of the train and eval steps' memory traffic for each traffic cut (docs/traffic_cuts.md).

    nice -n 10 python benchmarks/traffic_cuts.py --out_dir=/tmp/cuts                 # reduced T, every variant
    nice -n 10 python benchmarks/traffic_cuts.py --out_dir=/tmp/cuts --variants=base,remat_dots
    nice -n 10 python benchmarks/traffic_cuts.py --out_dir=/tmp/cuts_full --depths=full --variants=base,best
    python benchmarks/traffic_cuts.py --out_dir=/tmp/cuts --table_only                 # the table of what is done
    nice -n 10 python benchmarks/traffic_cuts.py --block=0 --out_dir=/tmp/blk          # one stage-0 block alone
    python benchmarks/traffic_cuts.py --floor --depths=full                            # the floors, no compile

Each variant is a set of ``--config.FIELD`` overrides of ``configs/k400_tiny.py``
(Video-FocalNet-T's widths; ``--depths`` picks the blocks per stage, default
``(1,1,1,1)``; ``full`` is T's ``(2,2,6,2)``), compiled with ``plan.make_report``
for ``--topology`` (v5e:2x2) on this host: the TPU compiler's train step at
``--clips_per_chip`` (8) and eval step (``--eval_videos_per_chip`` videos x 12
views). One JSON per variant goes to ``--out_dir`` so variants can run one at a
time (in the background) and the table is printed from whatever is there:
bytes accessed per clip, the estimated step time, MFU and memory per chip, each
also as a ratio to the ``base`` variant (today's defaults). Nothing runs on a TPU.

``--block=STAGE`` compiles one block of that stage alone for one chip (forward+backward and forward: about
a minute each instead of tens of minutes for the whole steps); ``--floor`` prints, without compiling, the
least bytes per clip the blocks must move (see ``floor``).
"""
from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import re
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# name -> (what it changes, config overrides). 'base' is today's defaults.
VARIANTS: dict[str, tuple[str, dict]] = {
    "base": ("today's defaults (no remat)", {}),
    "remat": ("model.remat=True (nothing saved: recompute each block)", {"model.remat": True}),
    "remat_dots": ("remat, matmul outputs saved", {"model.remat": True, "model.remat_policy": "dots"}),
    "remat_dots_nb": ("remat, saving matmul outputs with no batch dims",
                      {"model.remat": True, "model.remat_policy": "dots_no_batch"}),
    "remat_modulators": ("remat, saving the modulators (q, m_s, m_t)",
                         {"model.remat": True, "model.remat_policy": "modulators"}),
    "ln_recompute": ("LayerNorm VJP keeps only its input", {"model.layer_norm_impl": "recompute"}),
    "split_proj": ("focal projections: a matmul per group, the gates as reductions",
                   {"model.focal_projection": "split"}),
    "split_spatial": ("the spatial projection split, the temporal one fused",
                      {"model.focal_projection": "split_spatial"}),
    "split_frames": ("split projections, temporal branch in place",
                     {"model.focal_projection": "split", "model.temporal_layout": "frames"}),
    "split_ln": ("split projections, LayerNorm VJP keeps only its input",
                 {"model.focal_projection": "split", "model.layer_norm_impl": "recompute"}),
    "shift": ("depthwise convs as shifted multiplies", {"model.depthwise_impl": "shift"}),
    "frames": ("temporal branch in place (B, T, H, W, C)", {"model.temporal_layout": "frames"}),
}


def _parse(value: str, current):
  try:
    parsed = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    parsed = value
  if isinstance(current, (tuple, list)):
    return type(current)(parsed)
  return parsed


def build_config(overrides: dict, depths, clips_per_chip: int, eval_videos_per_chip: int, chips: int):
  from vfocal_jax.configs import k400_tiny
  config = k400_tiny.get_config()
  if depths is not None:
    config.model.depths = tuple(depths)
  config.batch_size = clips_per_chip * chips
  config.eval_batch_size = eval_videos_per_chip * chips
  from vfocal_jax import config_fields
  # new_fields: a field of a newer config (another checkout's) is set too.
  return config_fields.updated(config, {key: _parse(value, config_fields.get(config, key)) if isinstance(value, str)
                                        else value for key, value in overrides.items()}, new_fields=True)


def summary(report: dict) -> dict:
  """The figures of the table, per step."""
  out = {}
  for name in ("train", "eval"):
    s = report.get(name)
    if not s or not s["ok"]:
      out[name] = None if not s else {"error": s["error"]}
      continue
    clips = s["clips_per_chip"]
    parts = {}
    for row in (s.get("traffic") or {}).get("parts", []):
      parts[row["part"]] = row
    out[name] = {
        "bytes_per_clip": s["bytes_accessed_per_chip"] / clips if s["bytes_accessed_per_chip"] else None,
        "ms": None if s["estimated_step_seconds"] is None else 1e3 * s["estimated_step_seconds"],
        "mfu": s["estimated_mfu"], "memory_per_chip": s["total_bytes_per_chip"],
        "flops_per_clip": None if s["flops_per_chip"] is None else s["flops_per_chip"] / clips,
        "compile_seconds": (s["lower_seconds"] or 0) + (s["compile_seconds"] or 0)}
  return out


def run_variant(name: str, args) -> dict:
  from vfocal_jax import plan
  what, overrides = VARIANTS[name]
  overrides = dict(overrides)
  for item in args.set:
    key, value = item.split("=", 1)
    overrides[key] = value
  devices = plan.target_devices(args.topology)
  chips, _ = plan.tpu_specs.chip_layout(devices)
  depths = None if args.depths == "full" else ast.literal_eval(args.depths)
  config = build_config(overrides, depths, args.clips_per_chip, args.eval_videos_per_chip, chips)
  t0 = time.time()
  report, _ = plan.make_report(config, topology=args.topology, train_only=args.train_only, log=lambda s: None)
  report = report.to_json()
  report["variant"], report["what"] = name, what
  report["overrides"] = {k: str(v) for k, v in overrides.items()}
  report["depths"] = args.depths
  report["wall_seconds"] = time.time() - t0
  report["summary"] = summary(report)
  return report


_BLOCK_FIELDS = ("layer_norm_impl", "focal_projection", "depthwise_impl", "temporal_layout")


def run_block(name: str, args, stage: int) -> dict:
  """One block of stage ``stage`` (T's widths, 8x224), compiled alone for one chip of ``--topology``.

  ``train``: its forward and backward (``jax.vjp``) on ``--clips_per_chip`` clips; ``eval``: its forward on
  ``12 x --eval_videos_per_chip`` clips. Minutes of compile instead of the whole step's tens of minutes.
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from vfocal_jax import hlo_traffic, plan
  from vfocal_jax.models.video_focalnet import VideoFocalNetBlock, remat_policy
  what, overrides = VARIANTS[name]
  model = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("model.")}
  for item in args.set:
    key, value = item.split("=", 1)
    model[key.split(".", 1)[1]] = _parse(value, None)
  mk = {"focal_window": 3, "focal_level": 2, "num_frames": 8, "depthwise_impl": "xla",
        **{k: v for k, v in model.items() if k in _BLOCK_FIELDS}}
  cls = VideoFocalNetBlock
  if model.get("remat"):
    cls = nn.remat(VideoFocalNetBlock, policy=remat_policy(model.get("remat_policy", "nothing")))
  block = cls(modulation_kwargs=mk, dtype=jnp.bfloat16)
  dev = plan.target_devices(args.topology)[0]
  sh = jax.sharding.SingleDeviceSharding(dev)
  side, c = 56 >> stage, 96 << stage
  out = {"variant": name, "what": what, "overrides": {k: str(v) for k, v in overrides.items()}, "stage": stage,
         "summary": {}}
  steps = [("train", args.clips_per_chip)] + ([] if args.train_only else [("eval", 12 * args.eval_videos_per_chip)])
  for step, clips in steps:
    x = jax.ShapeDtypeStruct((clips * 8, side, side, c), jnp.bfloat16, sharding=sh)
    params = jax.eval_shape(lambda: block.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype)))["params"]
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), params)
    if step == "train":
      def f(p, x, g):
        _, vjp = jax.vjp(lambda p, x: block.apply({"params": p}, x), p, x)
        return vjp(g)
      lower = lambda: jax.jit(f).lower(params, x, x)
    else:
      lower = lambda: jax.jit(lambda p, x: block.apply({"params": p}, x)).lower(params, x)
    t0 = time.time()
    compiled = lower().compile()
    # Name the block as the whole model's stage `stage` block 0, so that hlo_traffic splits it into its parts.
    text = re.sub(r"VideoFocalNetBlock(\)*)/", rf"VideoFocalNet\1/layers_{stage}/blocks_0/", compiled.as_text())
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    b = hlo_traffic.breakdown(text, per=clips, top=10)
    mem = plan.tpu_specs.memory_stats(compiled)
    out[step] = {"traffic": b}
    out["summary"][step] = {
        "bytes_per_clip": cost["bytes accessed"] / clips, "cycles": b["estimated_cycles"],
        "flops_per_clip": cost["flops"] / clips, "memory_per_chip": mem["total"], "ms": None, "mfu": None,
        "compile_seconds": time.time() - t0}
  return out


def floor(name: str, depths=(2, 2, 6, 2), clips: int = 8) -> dict:
  """The least a block can move per clip: its input and output once, and what autodiff keeps for the backward.

  Per stage (T's widths, 8x224, bf16, no TPU padding): ``residuals`` (``jax``'s saved residuals of the block's
  VJP under the variant's options, the block input included), ``train`` = forward read input + write output +
  write residuals, backward read cotangent + write input cotangent + read residuals; ``eval`` = read input +
  write output. Summed over ``depths`` blocks. No compile: a floor to hold the compiled bytes against.
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax._src.ad_checkpoint import saved_residuals
  from vfocal_jax.models.video_focalnet import VideoFocalNetBlock, remat_policy
  _, overrides = VARIANTS[name]
  model = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("model.")}
  mk = {"focal_window": 3, "focal_level": 2, "num_frames": 8, "depthwise_impl": "xla",
        **{k: v for k, v in model.items() if k in _BLOCK_FIELDS}}
  cls = VideoFocalNetBlock
  if model.get("remat"):
    cls = nn.remat(VideoFocalNetBlock, policy=remat_policy(model.get("remat_policy", "nothing")))
  block = cls(modulation_kwargs=mk, dtype=jnp.bfloat16)
  out = {"variant": name, "stages": []}
  for stage, depth in enumerate(depths):
    side, c = 56 >> stage, 96 << stage
    x = jnp.zeros((clips * 8, side, side, c), jnp.bfloat16)
    params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                          jax.eval_shape(lambda: block.init(jax.random.key(0), x))["params"])
    res = saved_residuals(lambda p, x: jnp.sum(block.apply({"params": p}, x).astype(jnp.float32)), params, x)
    act = x.size * x.dtype.itemsize / clips
    fwd = lambda p, x: block.apply({"params": p}, x)
    eval_io = _matmul_io(jax.make_jaxpr(fwd)(params, x).jaxpr) / clips
    train_io = _matmul_io(jax.make_jaxpr(lambda p, x: jax.vjp(fwd, p, x)[1](x))(params, x).jaxpr) / clips
    resid = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a, why in res
                if not str(why).startswith("from the argument p")) / clips
    out["stages"].append({"stage": stage, "blocks": depth, "activation": act, "residuals": resid,
                          "train": depth * (4 * act + 2 * resid), "eval": depth * 2 * act,
                          "train_matmul_io": depth * train_io, "eval_matmul_io": depth * eval_io})
  for key in ("train", "eval", "train_matmul_io", "eval_matmul_io"):
    out[key] = sum(s[key] for s in out["stages"])
  return out


def _matmul_io(jaxpr) -> float:
  """Bytes the matmuls and convolutions of ``jaxpr`` read and write, each operand and result once.

  The traffic of a program in which every element-wise op is fused into a matmul or convolution
  and nothing else is materialised (no padding): what op-by-op compilation cannot go below.
  """
  import numpy as np
  total = 0.0
  for eqn in jaxpr.eqns:
    for sub in _subjaxprs(eqn):
      total += _matmul_io(sub)
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      for v in list(eqn.invars) + list(eqn.outvars):
        aval = v.aval
        total += int(np.prod(aval.shape)) * aval.dtype.itemsize
  return total


def _subjaxprs(eqn):
  for value in eqn.params.values():
    for v in (value if isinstance(value, (tuple, list)) else (value,)):
      if hasattr(v, "eqns"):
        yield v
      elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
        yield v.jaxpr


def block_table(reports: list[dict]) -> str:
  base = next((r for r in reports if r["variant"] == "base"), None)
  lines = ["| variant | step | bytes accessed / clip | est. cycles (cost model) | memory / chip |",
           "|---|---|---|---|---|"]
  for name in ("train", "eval"):
    for r in reports:
      s = r["summary"].get(name)
      if s is None:
        continue
      b = (base or {}).get("summary", {}).get(name) or {}
      lines.append(f"| {r['variant']} | {name} | {s['bytes_per_clip'] / 2 ** 20:,.1f} MiB"
                   f"{_ratio(s['bytes_per_clip'], b.get('bytes_per_clip'))} | {s['cycles'] or 0:,.0f}"
                   f"{_ratio(s['cycles'], b.get('cycles'))} | {s['memory_per_chip'] / 2 ** 20:,.0f} MiB"
                   f"{_ratio(s['memory_per_chip'], b.get('memory_per_chip'))} |")
  return "\n".join(lines)


def _ratio(x, base):
  return "" if x is None or not base else f" ({x / base:.2f}x)"


def table(reports: list[dict]) -> str:
  base = next((r for r in reports if r["variant"] == "base"), None)
  lines = ["| variant | step | bytes accessed / clip | est. step | est. MFU | memory / chip |",
           "|---|---|---|---|---|---|"]
  for name in ("train", "eval"):
    for r in reports:
      s = r["summary"].get(name)
      if s is None:
        continue
      if "error" in s:
        lines.append(f"| {r['variant']} | {name} | does not compile: {s['error']} | | | |")
        continue
      b = (base or {}).get("summary", {}).get(name) or {}
      mib, gib = s["bytes_per_clip"] / 2 ** 20, s["memory_per_chip"] / 2 ** 30
      lines.append(
          f"| {r['variant']} | {name} | {mib:,.0f} MiB{_ratio(s['bytes_per_clip'], b.get('bytes_per_clip'))} | "
          f"{s['ms']:.2f} ms{_ratio(s['ms'], b.get('ms'))} | {100 * s['mfu']:.1f}%"
          f"{_ratio(s['mfu'], b.get('mfu'))} | {gib:.2f} GiB{_ratio(s['memory_per_chip'], b.get('memory_per_chip'))} |")
  return "\n".join(lines)


def parts_table(reports: list[dict], step: str = "train", top: int = 14) -> str:
  """MiB per clip of the largest parts, summed over blocks (``hlo_traffic``'s ``by_component``), per variant."""
  cols = [r for r in reports if r.get(step) and r[step].get("traffic")]
  if not cols:
    return ""
  gs = [{row["name"]: row["bytes"] for row in r[step]["traffic"]["by_component"]} for r in cols]
  keys = sorted(gs[0], key=lambda k: -gs[0][k])[:top]
  lines = ["| part (" + step + ", MiB / clip) | " + " | ".join(r["variant"] for r in cols) + " |",
           "|---|" + "---|" * len(cols)]
  for k in keys:
    lines.append(f"| {k} | " + " | ".join(f"{g.get(k, 0) / 2 ** 20:,.0f}" for g in gs) + " |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variants", default=",".join(VARIANTS), help="Comma-separated names of VARIANTS.")
  parser.add_argument("--out_dir", default=os.path.join(ROOT, "workdir_traffic_cuts"))
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument("--depths", default="(1,1,1,1)", help="Blocks per stage, or 'full' (T's 2,2,6,2).")
  parser.add_argument("--clips_per_chip", type=int, default=8)
  parser.add_argument("--eval_videos_per_chip", type=int, default=1)
  parser.add_argument("--train_only", action="store_true")
  parser.add_argument("--set", action="append", default=[], help="FIELD=VALUE override for every variant.")
  parser.add_argument("--table_only", action="store_true")
  parser.add_argument("--force", action="store_true", help="Recompile variants already in out_dir.")
  parser.add_argument("--floor", action="store_true",
                      help="Print the least bytes per clip the blocks can move (no compile) for --variants.")
  parser.add_argument("--block", type=int, default=None, metavar="STAGE",
                      help="Compile one block of this stage alone (fwd+bwd and fwd) instead of the whole steps.")
  args = parser.parse_args()
  if args.floor:
    depths = (2, 2, 6, 2) if args.depths == "full" else ast.literal_eval(args.depths)
    print(f"blocks {tuple(depths)}, MiB per clip (bf16, unpadded): residuals kept per block by stage; floors")
    print("| variant | residuals / block, stages 0-3 | train: I/O + residuals | train: matmul I/O | "
          "eval: I/O | eval: matmul I/O |\n|---|---|---|---|---|---|")
    for name in filter(None, args.variants.split(",")):
      f = floor(name, depths, args.clips_per_chip)
      per = ", ".join(f"{s['residuals'] / 2 ** 20:.2f}" for s in f["stages"])
      mib = lambda k: f"{f[k] / 2 ** 20:,.1f}"
      print(f"| {name} | {per} | {mib('train')} | {mib('train_matmul_io')} | {mib('eval')} | "
            f"{mib('eval_matmul_io')} |", flush=True)
    return
  os.makedirs(args.out_dir, exist_ok=True)
  tag = "full" if args.depths == "full" else args.depths.strip("()").replace(",", "").replace(" ", "")
  if args.block is not None:
    tag = f"block{args.block}"
  if not args.table_only:
    for name in filter(None, args.variants.split(",")):
      if name not in VARIANTS:
        parser.error(f"--variants: unknown {name!r}; known: {', '.join(VARIANTS)}")
      path = os.path.join(args.out_dir, f"{tag}_{name}.json")
      if os.path.exists(path) and not args.force:
        continue
      report = run_block(name, args, args.block) if args.block is not None else run_variant(name, args)
      with open(path, "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
      print(f"{name}: {json.dumps(report['summary'])}", flush=True)
  for t in sorted({os.path.basename(p).split("_", 1)[0] for p in glob.glob(os.path.join(args.out_dir, "*.json"))}):
    reports = []
    for path in sorted(glob.glob(os.path.join(args.out_dir, f"{t}_*.json"))):
      with open(path) as f:
        reports.append(json.load(f))
    order = list(VARIANTS)
    reports.sort(key=lambda r: order.index(r["variant"]) if r["variant"] in order else len(order))
    if t.startswith("block"):
      print(f"\none block of stage {t[5:]}, one chip of {args.topology}:\n" + block_table(reports))
    else:
      print(f"\ndepths {reports[0]['depths']}, {reports[0]['topology']}:\n" + table(reports))
    print("\n" + parts_table(reports, "train"))
    print("\n" + parts_table(reports, "eval"))


if __name__ == "__main__":
  main()
