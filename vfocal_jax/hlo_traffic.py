"""Where a compiled step's memory traffic and estimated time go: per op and per part of the model.

Reads the text of a compiled module (``compiled.as_text()``, after XLA's fusion
passes). Every instruction the program runs at the top level (a fusion, a
convolution, a copy, a collective, ...) reads its operands from memory and
writes its result there once, so its bytes are the sizes of those buffers;
fused work in between never leaves the chip. The TPU compiler writes its cost
model's ``estimated_cycles`` into each op's backend config (absent on CPU and
GPU). Each op's JAX name stack (``metadata={op_name=...}``) says which part of
the model or the step made it: ``jvp(VideoFocalNet)/layers_1/blocks_0/
modulation/modulation._temporal/...`` is the forward of stage 1 block 0's
temporal branch, ``transpose(jvp(...))`` its backward.

Bytes held in a non-default memory space (``S(1)``: a TPU's VMEM) are counted
apart (``on_chip_bytes``): they do not cross HBM. Ops inside a ``while`` body
count ``known_trip_count`` times when the compiler knows it (else once); the
branches of a ``conditional`` count as their mean (one of them runs).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import re
from typing import Iterable

from vfocal_jax.tpu_specs import tuple_elements

# Bits per element of HLO primitive types.
_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16, "bf16": 16,
         "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64, "c64": 64, "c128": 128,
         "f8e4m3fn": 8, "f8e5m2": 8, "f8e4m3b11fnuz": 8, "f8e4m3fnuz": 8, "f8e5m2fnuz": 8, "token": 0}
# Instructions that move no data of their own.
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
         "replica-id", "opt-barrier", "add-dependency"}
_CONTROL = {"while", "conditional", "call"}
# Custom calls of the TPU compiler that only name or alias buffers.
_FREE_CUSTOM_CALLS = {"AllocateBuffer", "ConcatBitcast", "AssumeGatherIndicesInBound"}
_SLICES = {"slice-start", "dynamic-slice-start"}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all",
               "collective-broadcast", "ragged-all-to-all")

_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?(%[\w.\-]+)\s*=\s*(.*?)\s+([a-z][a-z0-9\-]*)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?(%[\w.\-]+)\s*(?:\(.*\))?\s*->.*\{\s*$")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass
class Op:
  """One top-level instruction and what it costs each time the step runs."""
  name: str
  opcode: str
  shape: str          # The result type as printed, layout stripped.
  op_name: str        # The JAX name stack ('' when the compiler made the op up).
  part: str           # See ``part_of``.
  hbm_bytes: float    # Operands read plus result written, in the default memory space.
  on_chip_bytes: float
  cycles: float       # The TPU cost model's estimate (0 when absent).
  count: float = 1.0  # Runs per step (trip counts, branch weights).

  @property
  def bytes(self) -> float:
    """Bytes moved in every memory space (what the compiler's ``bytes accessed`` counts)."""
    return self.hbm_bytes + self.on_chip_bytes


def _padded_elements(dims: list[int], layout: str) -> int:
  """Elements an array occupies: its TPU tiling ``T(a,b)`` pads the most-minor dims to whole tiles."""
  m = re.match(r"\{([0-9,]*)(?::(.*))?\}", layout or "")
  tile = re.search(r"T\(([0-9,]+)\)", m.group(2) or "") if m else None
  if not (m and tile and dims):
    n = 1
    for d in dims:
      n *= d
    return n
  minor_to_major = [int(i) for i in filter(None, m.group(1).split(","))] or list(range(len(dims)))[::-1]
  padded = list(dims)
  sizes = [int(t) for t in tile.group(1).split(",")]
  for t, axis in zip(reversed(sizes), minor_to_major):  # The tile's last size is the most-minor dim.
    padded[axis] = -(-padded[axis] // t) * t
  n = 1
  for d in padded:
    n *= d
  return n


def array_bytes(type_text: str) -> tuple[int, int]:
  """(default-memory bytes, other-memory-space bytes) of every array in an HLO type string, tiles padded."""
  hbm = chip = 0
  for dtype, dims, layout in _ARRAY.findall(type_text):
    if dtype not in _BITS:
      continue
    size = (_padded_elements([int(d) for d in filter(None, dims.split(","))], layout) * _BITS[dtype] + 7) // 8
    space = re.search(r"S\((\d+)\)", layout or "")
    if space and space.group(1) != "0":
      chip += size
    else:
      hbm += size
  return hbm, chip


def _strip_layout(type_text: str) -> str:
  return re.sub(r"\{[^{}]*\}|/\*.*?\*/", "", type_text).strip()


def _split_args(rest: str) -> tuple[str, str]:
  """``'a, b), attr=...'`` -> (``'a, b'``, ``'attr=...'``): the operand list up to its closing paren."""
  depth = 1
  for i, ch in enumerate(rest):
    if ch in "({[":
      depth += 1
    elif ch in ")}]":
      depth -= 1
      if depth == 0:
        return rest[:i], rest[i + 1:]
  return rest, ""


@dataclasses.dataclass
class _Instr:
  name: str
  type_text: str
  opcode: str
  operands: list[str]
  attrs: str


def parse_module(text: str) -> tuple[dict[str, list[_Instr]], str]:
  """Computations of an HLO module text, in order, and the name of the entry computation."""
  comps: dict[str, list[_Instr]] = {}
  entry, current = "", None
  for line in text.splitlines():
    if current is None:
      m = _COMP.match(line)
      if m:
        current = m.group(1)
        comps[current] = []
        if line.startswith("ENTRY"):
          entry = current
      continue
    if line.startswith("}"):
      current = None
      continue
    m = _INSTR.match(line)
    if m:
      name, type_text, opcode, rest = m.groups()
      args, attrs = _split_args(rest)
      comps[current].append(_Instr(name, type_text, opcode, re.findall(r"%[\w.\-]+", args), attrs))
  return comps, entry


def _called(attrs: str, key: str) -> list[str]:
  m = re.search(key + r"=\{([^}]*)\}", attrs) or re.search(key + r"=(%[\w.\-]+)", attrs)
  return re.findall(r"%[\w.\-]+", m.group(1)) if m else []


def ops_of_module(text: str) -> list[Op]:
  """Every op the step runs (fusions are one op each), with bytes, estimated cycles and part."""
  comps, entry = parse_module(text)
  out: list[Op] = []

  def visit(comp: str, weight: float) -> None:
    instrs = comps.get(comp, [])
    types = {i.name: i.type_text for i in instrs}
    for ins in instrs:
      if ins.opcode in _FREE or ins.opcode.endswith("-done"):
        continue
      if ins.opcode in _CONTROL:
        if ins.opcode == "while":
          trips = _TRIPS.search(ins.attrs)
          visit(_called(ins.attrs, "body")[0], weight * (int(trips.group(1)) if trips else 1))
        elif ins.opcode == "conditional":
          branches = _called(ins.attrs, "branch_computations") or (
              _called(ins.attrs, "true_computation") + _called(ins.attrs, "false_computation"))
          for b in branches:
            visit(b, weight / len(branches))
        else:
          for f in _called(ins.attrs, "to_apply"):
            visit(f, weight)
        continue
      target = re.search(r'custom_call_target="([^"]*)"', ins.attrs)
      if ins.opcode == "custom-call" and target and target.group(1) in _FREE_CUSTOM_CALLS:
        continue
      operand_types = [types.get(operand, "") for operand in ins.operands]
      result = ins.type_text
      if ins.opcode.endswith("-start"):
        # Async pairs: copy-start is (destination, source, context); the others wrap their
        # operands, (operands, result, context), or are (operand, result).
        parts = tuple_elements(ins.type_text)
        result = parts[0] if ins.opcode == "copy-start" else parts[min(1, len(parts) - 1)]
        if ins.opcode in _SLICES:  # Reads only the slice it writes.
          operand_types = [result]
      hbm, chip = array_bytes(result)
      for operand_type in operand_types:
        h, c = array_bytes(operand_type)
        hbm, chip = hbm + h, chip + c
      m = _OPNAME.search(ins.attrs)
      op_name = m.group(1) if m else ""
      cycles = _CYCLES.search(ins.attrs)
      out.append(Op(ins.name.lstrip("%"), ins.opcode, _strip_layout(ins.type_text), op_name,
                    part_of(op_name, ins.opcode), hbm * weight, chip * weight,
                    (int(cycles.group(1)) if cycles else 0) * weight, weight))

  if entry:
    visit(entry, 1.0)
  return out


# --- Parts. ---------------------------------------------------------------------------------------

_BLOCK = re.compile(r"layers_(\d+)/blocks_(\d+)/(\w+)")


def _block_component(rest: str) -> str:
  if rest.startswith("modulation"):
    if "_temporal" in rest:
      return "temporal"
    if "_spatial" in rest:
      return "spatial"
    return "gating"
  if rest.startswith("norm"):
    return "norm"
  if rest.startswith("mlp") or rest.startswith("Mlp"):
    return "mlp"
  if rest.startswith("Dropout") or rest.startswith("drop"):
    return "drop_path"
  return "residual"


def part_of(op_name: str, opcode: str = "") -> str:
  """The part of the model or step an op comes from, e.g. ``'stage1.block0.temporal bwd'``.

  Model parts: ``stem``, ``stageI.blockJ.{norm,spatial,temporal,gating,mlp,drop_path,residual}``,
  ``stageI.downsample``, ``head`` (final norm, pooling, classifier), each with ``fwd`` or
  ``bwd``. Step parts (named scopes of the train step): ``input`` (normalisation), ``mixup``,
  ``loss``, ``optimizer``, ``metrics``; ``collectives`` for any collective op; ``prefetch`` and ``compiler slices`` for the
  compiler's unnamed copies between memory spaces and async slices; ``other`` for what carries no name.
  """
  if opcode.replace("-start", "") in COLLECTIVES:
    return "collectives"
  model = op_name.find("VideoFocalNet")
  if model >= 0:
    direction = "bwd" if "transpose(" in op_name[:model] else "fwd"
    rest = op_name[model:].split("/", 1)[1] if "/" in op_name[model:] else ""
    m = _BLOCK.match(rest)
    if m:
      stage, block, tail = m.group(1), m.group(2), rest[m.start(3):]
      return f"stage{stage}.block{block}.{_block_component(tail)} {direction}"
    m = re.match(r"layers_(\d+)/downsample", rest)
    if m:
      return f"stage{m.group(1)}.downsample {direction}"
    if rest.startswith("patch_embed") or rest.startswith("stem"):
      return f"stem {direction}"
    return f"head {direction}"
  if opcode == "copy-start" and not op_name:
    return "prefetch"  # The compiler's own copies between memory spaces (weights, optimizer state).
  if opcode in _SLICES and not op_name:
    return "compiler slices"  # Async slices the compiler adds to split a buffer (no name of ours).
  for scope in ("input", "mixup", "loss", "optimizer", "metrics"):
    # A scope appears as '/loss/', or inside a transformation's name: 'jvp(loss)', 'transpose(jvp(loss))'.
    if re.search(rf"(^|/|\(){scope}(/|\)|$)", op_name):
      return scope
  return "other"


def component_of(part: str) -> str:
  """``'stage1.block0.temporal bwd'`` -> ``'temporal bwd'``: the part summed over blocks."""
  m = re.match(r"stage\d+\.block\d+\.(.*)", part)
  if m:
    return m.group(1)
  m = re.match(r"stage\d+\.(downsample.*)", part)
  return m.group(1) if m else part


# --- Reports. -------------------------------------------------------------------------------------

def totals(ops: Iterable[Op], key=lambda op: op.part) -> dict[str, dict[str, float]]:
  """``{group: {'bytes', 'hbm_bytes', 'cycles', 'ops'}}``, largest traffic first."""
  acc: dict[str, dict[str, float]] = collections.defaultdict(
      lambda: {"bytes": 0.0, "hbm_bytes": 0.0, "cycles": 0.0, "ops": 0})
  for op in ops:
    t = acc[key(op)]
    t["bytes"] += op.bytes
    t["hbm_bytes"] += op.hbm_bytes
    t["cycles"] += op.cycles
    t["ops"] += 1
  return dict(sorted(acc.items(), key=lambda kv: -kv[1]["bytes"]))


def breakdown(compiled_text: str, *, top: int = 15, per: float = 1.0) -> dict:
  """The JSON-able breakdown of one compiled program; ``per`` divides the bytes (e.g. clips per device).

  ``bytes`` count every memory space; ``hbm_bytes`` only the default one (on a
  TPU, what crosses HBM; a tiny model may live wholly in VMEM).
  """
  ops = ops_of_module(compiled_text)
  total = sum(op.bytes for op in ops)
  total_cycles = sum(op.cycles for op in ops)

  def row(label, t, extra=None):
    r = {"name": label, "bytes": t["bytes"] / per, "hbm_bytes": t["hbm_bytes"] / per,
         "bytes_share": t["bytes"] / total if total else 0.0,
         "cycles_share": t["cycles"] / total_cycles if total_cycles else None}
    r.update(extra or {})
    return r

  def top_ops(key):
    chosen = sorted(ops, key=key, reverse=True)[:top]
    return [row(op.name, {"bytes": op.bytes, "hbm_bytes": op.hbm_bytes, "cycles": op.cycles},
                {"opcode": op.opcode, "part": op.part, "shape": op.shape, "op_name": op.op_name[-160:]})
            for op in chosen]

  by_part = totals(ops)
  return {
      "per": per,
      "bytes": total / per,
      "hbm_bytes": sum(op.hbm_bytes for op in ops) / per,
      "estimated_cycles": total_cycles or None,
      "unattributed_bytes": by_part.get("other", {"bytes": 0.0})["bytes"] / per,
      "ops": len(ops),
      "by_component": [row(k, v, {"ops": v["ops"]}) for k, v in totals(ops, lambda op: component_of(op.part)).items()],
      "by_part": [row(k, v, {"ops": v["ops"]}) for k, v in by_part.items()],
      "top_by_bytes": top_ops(lambda op: op.bytes),
      "top_by_cycles": top_ops(lambda op: op.cycles) if total_cycles else [],
  }


def format_breakdown(b: dict, title: str, rows: int = 12) -> str:
  """A text table: traffic per component (summed over blocks) and the heaviest ops."""
  per = "" if b["per"] == 1 else " per clip"
  mib = lambda x: x / 2**20
  lines = [f"{title}: {mib(b['bytes']):,.1f} MiB moved{per} ({mib(b['hbm_bytes']):,.1f} MiB through HBM) "
           f"in {b['ops']} ops; {b['unattributed_bytes'] / max(b['bytes'], 1e-9):.1%} unattributed"]
  cyc = b["estimated_cycles"] is not None
  lines.append(f"  {'part (all blocks)':<24}{'MiB':>10}{'HBM MiB':>10}{'bytes':>8}" + (f"{'time':>8}" if cyc else ""))
  for r in b["by_component"][:rows]:
    lines.append(f"  {r['name']:<24}{mib(r['bytes']):>10,.1f}{mib(r['hbm_bytes']):>10,.1f}{r['bytes_share']:>8.1%}"
                 + (f"{r['cycles_share']:>8.1%}" if cyc else ""))
  lines.append(f"  heaviest ops{per}:")
  for r in b["top_by_bytes"][:min(rows, 8)]:
    lines.append(f"    {mib(r['bytes']):>9,.2f} MiB  {r['opcode']:<13} {r['part']:<26} {r['shape'][:56]}")
  return "\n".join(lines)


if __name__ == "__main__":  # python -m vfocal_jax.hlo_traffic compiled.txt
  import sys
  print(json.dumps(breakdown(open(sys.argv[1]).read(), top=5), indent=1)[:4000])
