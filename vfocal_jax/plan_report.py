"""``plan``'s results as dataclasses, their JSON (``to_json()``, the ``--json`` file) and the printed report.

``Report`` holds one ``StepReport`` per step (train, eval), the ``InputBudget``
and the batch search. ``to_json()`` gives the JSON-able dict whose keys
docs/plan.md lists; ``format_report`` prints from that dict, so a report read
back from a ``--json`` file prints the same.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from vfocal_jax import hlo_traffic

GiB = 2 ** 30


def _omit_if_none() -> dict:
  return {"omit_if_none": True}


def to_jsonable(value: Any) -> Any:
  if hasattr(value, "to_json"):
    return value.to_json()
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if isinstance(value, dict):
    return {k: to_jsonable(v) for k, v in value.items()}
  return value


class JsonRecord:
  """``to_json()``: the fields as a dict (nested records too); a field marked ``omit_if_none`` only when set."""

  def to_json(self) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if f.metadata.get("internal") or (v is None and f.metadata.get("omit_if_none")):
        continue
      out[f.name] = to_jsonable(v)
    return out

  def __getitem__(self, key):  # The results were dicts until issue 22: say how to read them now.
    raise TypeError(f"{type(self).__name__} is a dataclass: read .{key} or .to_json()[{key!r}] (the --json dict)")

  def __setitem__(self, key, value):
    raise TypeError(f"{type(self).__name__} is a dataclass: set .{key}, or add {key!r} to .to_json()'s dict")


@dataclasses.dataclass
class StepReport(JsonRecord):
  """One compiled step, per chip (= per device x devices per chip; one GPU is one chip)."""
  ok: bool
  error: str | None
  global_batch: int                 # Clips (train) or videos (eval) of one step.
  batch_per_chip: float
  clips_per_chip: float
  lower_seconds: float | None = None
  compile_seconds: float | None = None
  failed_after_seconds: float | None = None
  hbm_bytes_per_chip: int | None = None
  fits: bool | None = None
  memory_per_chip: dict[str, int | None] | None = None  # argument, output, alias, temp, generated_code.
  total_bytes_per_chip: int | None = None
  flops_per_chip: float | None = None
  flops_source: str | None = None   # 'compiler' (cost_analysis) or 'model' (2 x the step's MACs).
  model_flops_per_chip: float | None = None
  bytes_accessed_per_chip: float | None = None
  bytes_source: str | None = None   # 'compiler' (cost_analysis) or 'hlo' (hlo_traffic of the compiled module).
  estimated_step_seconds: float | None = None
  estimated_clips_per_second_per_chip: float | None = None
  estimated_mfu: float | None = None
  roofline_step_seconds: float | None = None
  cost_analysis_raw: dict[str, float | None] | None = None
  unmodelled_custom_calls: dict[str, int] | None = None
  collectives: list[dict[str, Any]] | None = None
  traffic: dict[str, Any] | None = None
  measured_step_seconds: float | None = dataclasses.field(default=None, metadata=_omit_if_none())


@dataclasses.dataclass
class BatchSearchResult(JsonRecord):
  remat: bool
  fsdp: bool
  max_batch_per_chip: float | None  # Clips per chip per update; None: nothing fits.
  compiles: int
  seconds: float


@dataclasses.dataclass
class Report(JsonRecord):
  topology: str
  platform: str
  device_kind: str
  num_chips: int
  num_devices: int
  devices_per_chip: int
  mesh_shape: list[int]
  chip: dict[str, Any] | None       # name, hbm_bytes, hbm_bytes_per_second, peak_bf16_flops, source.
  config: dict[str, Any]
  estimates: str
  unknown: list[str] = dataclasses.field(default_factory=list)
  warnings: list[str] = dataclasses.field(default_factory=list)
  train: StepReport | None = None
  eval: StepReport | None = None
  input: Any = None                 # input_budget.InputBudget.
  search_batch: list[BatchSearchResult] | None = dataclasses.field(default=None, metadata=_omit_if_none())
  searched: bool = dataclasses.field(default=False, repr=False, metadata={"internal": True})

  def to_json(self) -> dict[str, Any]:
    out = super().to_json()
    if self.searched:  # Asked for: the key is there even when no search could run (None).
      out["search_batch"] = to_jsonable(self.search_batch)
    return out


# --- The printed report. ---------------------------------------------------------------------

def _gib(n) -> str:
  if n is None:
    return "?"
  return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2 ** 20:.1f} MiB"


def _secs(t) -> str:
  return "?" if t is None else (f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s")


HEADLINE = {
    "tpu": "Every time and FLOP count is the TPU compiler's cost-model estimate: nothing ran on a TPU.",
    "gpu": "Nothing ran on a GPU: memory and collectives are the CUDA compiler's; FLOPs are the step's matmuls and "
           "convolutions (2 per MAC); bytes are the compiled program's top-level reads and writes; the time is a "
           "roofline bound from the datasheet (the GPU compiler gives no cost estimate).",
}


def format_report(r: dict[str, Any] | Report) -> str:
  """The printed report of ``plan.run``: a pure function of its JSON form (a ``Report`` is converted)."""
  from vfocal_jax.input_budget import format_input  # pylint: disable=import-outside-toplevel
  if isinstance(r, Report):
    r = r.to_json()
  c = r["config"]
  lines = [f"plan: {c['dataset']} / {c['variant']}, {c['num_frames']}x{c['image_size']}, {c['dtype']}, remat "
           f"{c['remat']}, fsdp {c['fsdp']}, depthwise {c['depthwise_impl']}",
           f"target: {r['topology']}: {r['num_chips']} chip(s) ({r['device_kind']}), {r['devices_per_chip']} "
           f"device(s) per chip; mesh data={r['mesh_shape'][0]} model={r['mesh_shape'][1]}"]
  chip = r["chip"]
  if chip:
    lines.append(f"chip: {chip['hbm_bytes'] / GiB:.0f} GiB HBM at {chip['hbm_bytes_per_second'] / 1e9:.0f} "
                 f"GB/s, {chip['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16 peak (published: {chip['source']})")
  if r["platform"] in HEADLINE:
    lines.append(HEADLINE[r["platform"]])
  for name in ("train", "eval"):
    if r[name] is not None:
      lines.extend(_format_step(name, r[name], c))
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


def _format_step(name: str, s: dict[str, Any], c: dict[str, Any]) -> list[str]:
  what = (f"global batch {s['global_batch']} clips = {s['batch_per_chip']:g} per chip" if name == "train" else
          f"global batch {s['global_batch']} videos x {c['eval_views']} views = {s['clips_per_chip']:g} clips "
          "per chip")
  lines = [f"{name} step: {what}" + (f" (lowered in {s['lower_seconds']:.0f} s, compiled in "
                                     f"{s['compile_seconds']:.0f} s)" if s["ok"] else "")]
  if not s["ok"]:
    after = f" (after {s['failed_after_seconds']:.0f} s)" if s.get("failed_after_seconds") else ""
    lines.append(f"  does not compile{' (does not fit)' if s['fits'] is False else ''}{after}: {s['error']}")
    return lines
  m = s["memory_per_chip"]
  lines.append(f"  memory per chip: arguments {_gib(m['argument'])}, temporaries {_gib(m['temp'])}, outputs "
               f"{_gib(m['output'])}, aliased {_gib(m['alias'])}, code {_gib(m['generated_code'])}")
  hbm, total = s["hbm_bytes_per_chip"], s["total_bytes_per_chip"]
  verdict = ("unknown capacity" if hbm is None or total is None else
             f"{'fits' if s['fits'] else 'DOES NOT FIT'} ({100 * total / hbm:.0f}% of {_gib(hbm)})")
  lines.append(f"  total {_gib(total)} per chip: {verdict}")
  if s["flops_per_chip"] is not None:
    per_clip = s["flops_per_chip"] / s["clips_per_chip"] if s["clips_per_chip"] else float("nan")
    how = " (the model's count: 2 x MACs of its matmuls and convolutions)" if s.get("flops_source") == "model" else ""
    lines.append(f"  FLOPs per chip per step: {s['flops_per_chip']:.3g} ({per_clip / 1e9:.3g} GFLOP per clip){how}")
  if s.get("bytes_source") == "hlo" and s["bytes_accessed_per_chip"] is not None:
    lines.append(f"  bytes read and written per chip per step: {_gib(s['bytes_accessed_per_chip'])} (the compiled "
                 "program's top-level operands and results)")
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
    t = s["roofline_step_seconds"]
    lines.append(f"  roofline bound max(FLOPs / peak, bytes accessed / HBM bandwidth): {_secs(t)} -> at most "
                 f"{s['clips_per_chip'] / t:.1f} clips/s per chip")
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
  return lines
