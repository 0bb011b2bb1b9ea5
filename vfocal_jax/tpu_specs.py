"""What the compiler does not say about a TPU chip, and what ``plan`` reads from a compiled step.

``CHIPS``: HBM capacity, HBM bandwidth and peak bf16 throughput per chip,
keyed by ``jax.Device.device_kind``, as published in the Cloud TPU
system-architecture pages (https://cloud.google.com/tpu/docs/v2, .../v3,
.../v4, .../v5e, .../v5p, .../v6e: "Peak compute per chip (bf16)", "HBM
capacity" and "HBM bandwidth" per chip). The pages
give HBM in GiB for v2-v4 and in "GB" for v5e/v5p/v6e; the runtime's usable
limit matches GiB (the v5e compiler reports 15.75G available of 16 GiB, the
rest being its reserve), so GiB is used throughout.

A compile-only topology can expose one device per TensorCore (``v4``, ``v3``:
two devices per chip) or one per chip (``v5p`` megacore, ``v5e``, ``v6e``):
``chip_layout`` counts the devices per chip from their coordinates, and the
per-chip figures of ``plan`` are the per-device ones times that count.

The rest are pure functions over a compiled executable's own reports:
``memory_stats`` (``memory_analysis()``), ``cost_stats``
(``cost_analysis()``), ``collectives`` (the collective ops of
``as_text()``) and ``summarize_error`` (one line from a compile error).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  name: str                 # Cloud TPU name: v5e, v5p, ...
  hbm_bytes: int            # Per chip.
  peak_bf16_flops: float    # Per chip, dense bf16, per second.
  hbm_bytes_per_second: float  # Per chip.
  tensorcores: int          # Per chip.
  source: str               # Where the figures come from.


_DOCS = "https://cloud.google.com/tpu/docs/"
CHIPS: dict[str, ChipSpec] = {
    "TPU v2": ChipSpec("v2", 16 * GiB, 45e12, 600e9, 2, _DOCS + "v2"),
    "TPU v3": ChipSpec("v3", 32 * GiB, 123e12, 900e9, 2, _DOCS + "v3"),
    "TPU v4": ChipSpec("v4", 32 * GiB, 275e12, 1200e9, 2, _DOCS + "v4"),
    "TPU v5 lite": ChipSpec("v5e", 16 * GiB, 197e12, 819e9, 1, _DOCS + "v5e"),
    "TPU v5": ChipSpec("v5p", 95 * GiB, 459e12, 2765e9, 2, _DOCS + "v5p"),
    "TPU v5p": ChipSpec("v5p", 95 * GiB, 459e12, 2765e9, 2, _DOCS + "v5p"),
    "TPU v6 lite": ChipSpec("v6e", 32 * GiB, 918e12, 1638e9, 1, _DOCS + "v6e"),
    "TPU v6e": ChipSpec("v6e", 32 * GiB, 918e12, 1638e9, 1, _DOCS + "v6e"),
}


def chip_spec(device_kind: str) -> ChipSpec | None:
  return CHIPS.get(device_kind)


@dataclasses.dataclass(frozen=True)
class HostSpec:
  """The TPU VM that hosts a slice's chips (multi-host slices: several of these)."""
  machine_type: str         # GKE / Compute Engine machine type of the VM.
  vcpus: int                # Per VM (vCPUs are hyperthreads).
  chips: int                # TPU chips per VM.
  source: str

  @property
  def vcpus_per_chip(self) -> float:
    return self.vcpus / self.chips


# The 4-chip VM of each generation (the host of every multi-host slice of v4 / v5p / v6e, and of v5e
# slices from 2x4 on, whose 8-chip VM has the same vCPUs per chip): "VM types" of the system-architecture
# pages and the machine types of cloud.google.com/kubernetes-engine/docs/concepts/plan-tpus.
HOSTS: dict[str, HostSpec] = {
    "v4": HostSpec("ct4p-hightpu-4t", 240, 4, _DOCS + "v4"),
    "v5e": HostSpec("ct5lp-hightpu-4t", 112, 4, _DOCS + "v5e"),
    "v5p": HostSpec("ct5p-hightpu-4t", 208, 4, _DOCS + "v5p"),
    "v6e": HostSpec("ct6e-standard-4t", 180, 4, _DOCS + "v6e"),
}


def host_spec(chip: ChipSpec | None) -> HostSpec | None:
  return None if chip is None else HOSTS.get(chip.name)


def chip_layout(devices: Sequence[Any]) -> tuple[int, int]:
  """``(num_chips, devices_per_chip)``: TPU devices sharing coordinates are cores of one chip."""
  coords = [tuple(getattr(d, "coords", ()) or ()) for d in devices]
  if getattr(devices[0], "platform", "") != "tpu" or not all(coords):
    return len(devices), 1
  chips = len(set((getattr(d, "slice_index", 0),) + c for d, c in zip(devices, coords)))
  if len(devices) % chips:
    return len(devices), 1
  return chips, len(devices) // chips


# --- A compiled executable's own reports. ----------------------------------------------------

MEMORY_FIELDS = {"argument": "argument_size_in_bytes", "output": "output_size_in_bytes",
                 "alias": "alias_size_in_bytes", "temp": "temp_size_in_bytes",
                 "generated_code": "generated_code_size_in_bytes"}


def memory_stats(compiled) -> dict[str, int | None]:
  """Per-device bytes from ``compiled.memory_analysis()``; ``total`` = argument + output - alias + temp + code.

  Donated inputs reused for outputs (``alias``) are counted once. A field the
  backend does not report is None (and so is ``total``).
  """
  try:
    m = compiled.memory_analysis()
  except Exception:  # Some backends do not implement it.
    m = None
  out: dict[str, int | None] = {}
  for key, attr in MEMORY_FIELDS.items():
    v = getattr(m, attr, None) if m is not None else None
    out[key] = int(v) if v is not None and v >= 0 else None
  core = [out["argument"], out["output"], out["alias"], out["temp"]]
  out["total"] = (None if any(v is None for v in core)
                  else core[0] + core[1] - core[2] + core[3] + (out["generated_code"] or 0))
  return out


def cost_stats(compiled, hlo_text: str | None = None) -> dict[str, Any]:
  """Per-device ``flops``, ``bytes_accessed``, ``transcendentals``, ``optimal_seconds`` from ``cost_analysis()``.

  XLA's cost analysis books a custom call it has no model for at -1 second,
  -1 FLOP and -1 byte ("unknown"), so a program with N of them reports
  ``optimal_seconds`` near ``estimate - N``. The TPU compiler emits such
  calls outside fusions: ``ConcatBitcast`` (concatenations done as free
  bitcasts) once channels grow (``-7.0`` for 7, ``-31.0`` for 31, ``-338.9``
  for T's train step with 339), ``PrepareAsyncCallStart/Done`` pairs (T's eval
  step on v5p: -5.94 with 6). Its ``AllocateBuffer`` calls are costed
  (``COSTED_CUSTOM_CALLS``). Given the compiled module's text, the other
  custom calls outside fusions are counted (``unmodelled``: target -> count)
  and added back, i.e. counted as free; the raw figures stay under ``raw``.
  A figure still negative after that is None.
  """
  try:
    ca = compiled.cost_analysis()
  except Exception:
    ca = None
  if isinstance(ca, (list, tuple)):  # Older JAX: one dict per program.
    ca = ca[0] if ca else None
  ca = ca or {}
  keys = {"flops": "flops", "bytes_accessed": "bytes accessed", "transcendentals": "transcendentals",
          "optimal_seconds": "optimal_seconds"}
  raw = {k: (float(ca[v]) if ca.get(v) is not None else None) for k, v in keys.items()}
  unmodelled = {k: v for k, v in (unmodelled_custom_calls(hlo_text) if hlo_text else {}).items()
                if k not in COSTED_CUSTOM_CALLS}
  n = sum(unmodelled.values())
  out: dict[str, Any] = {}
  for k, v in raw.items():
    if v is not None and k != "transcendentals":
      v += n
    out[k] = v if v is not None and v >= 0 and not (k == "optimal_seconds" and v == 0) else None
  out["raw"], out["unmodelled"] = raw, unmodelled
  return out


# Custom-call targets the TPU cost model does cost (the others outside fusions are booked at -1: cost_stats).
# AllocateBuffer: T's train step has 2, and its estimate would be 2 s above its roofline bound if they were -1.
COSTED_CUSTOM_CALLS = ("AllocateBuffer",)
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_FUSION_CALLS = re.compile(r"\sfusion\(.*?calls=%?([\w.\-]+)")
_CUSTOM_CALL = re.compile(r"\scustom-call\(.*?custom_call_target=\"([^\"]+)\"")


def unmodelled_custom_calls(hlo_text: str) -> dict[str, int]:
  """Custom calls outside fused computations (where the cost analysis books them itself), by target."""
  fused = set(_FUSION_CALLS.findall(hlo_text))
  counts: dict[str, int] = {}
  current = None
  for line in hlo_text.splitlines():
    if line and not line[0].isspace():
      m = _COMPUTATION.match(line)
      if m:
        current = m.group(1)
      continue
    if current in fused:
      continue
    m = _CUSTOM_CALL.search(line)
    if m:
      counts[m.group(1)] = counts.get(m.group(1), 0) + 1
  return counts


def roofline_seconds(flops: float | None, bytes_accessed: float | None, chip: ChipSpec | None) -> float | None:
  """``max(FLOPs / peak, bytes / HBM bandwidth)`` per chip: a lower bound from the published rates."""
  if chip is None or flops is None or bytes_accessed is None:
    return None
  return max(flops / chip.peak_bf16_flops, bytes_accessed / chip.hbm_bytes_per_second)


_DTYPE_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16, "bf16": 16,
               "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64, "c64": 64, "c128": 128}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z0-9]*)?)\[([0-9,]*)\]")
COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all",
                    "ragged-all-to-all", "collective-broadcast")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>.*?)\s(?P<op>" + "|".join(COLLECTIVE_KINDS)
                    + r")(?P<suffix>-start|-done|-update)?\(")


def _array_bytes(type_str: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(type_str):
    bits = _DTYPE_BITS.get(dtype, 8 if dtype.startswith("f8") else None)
    if bits is None:
      continue
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * bits // 8
  return total


def tuple_elements(type_str: str) -> list[str]:
  """The elements of a tuple type ``(a, (b, c), d)``; ``[type_str]`` for an array."""
  s = re.sub(r"/\*.*?\*/", "", type_str.strip())
  if not s.startswith("("):
    return [s]
  parts, depth, start = [], 0, 1
  for i, ch in enumerate(s):
    if ch in "({[":
      depth += 1
    elif ch in ")}]":
      depth -= 1
    elif ch == "," and depth == 1:
      parts.append(s[start:i])
      start = i + 1
  parts.append(s[start:s.rfind(")")])
  return [p.strip() for p in parts if p.strip()]


def collective_ops(hlo_text: str) -> list[dict[str, Any]]:
  """``[{kind, bytes}]``, one per collective op of a compiled module's text, in order.

  ``bytes`` is the op's result per device (an all-gather's gathered array, an
  all-reduce's reduced arrays). Async pairs count once (the ``-start``; its
  result tuple holds the operands too, so only its second half is counted for
  gathers and permutes).
  """
  ops = []
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m or m.group("suffix") in ("-done", "-update"):
      continue
    kind, type_str = m.group("op"), m.group("type")
    if m.group("suffix") == "-start" and kind != "all-reduce":
      parts = [p for p in tuple_elements(type_str) if _array_bytes(p) and not re.fullmatch(r"\s*[su]32\[\].*", p)]
      type_str = ",".join(parts[len(parts) // 2:]) if len(parts) >= 2 else type_str
    ops.append({"kind": kind, "bytes": _array_bytes(type_str)})
  return ops


def collectives(hlo_text: str) -> list[dict[str, Any]]:
  """``[{kind, count, bytes}]``: ``collective_ops`` summed by kind, largest first.

  Counts are static: an op inside a loop (e.g. gradient accumulation) runs
  once per iteration.
  """
  found: dict[str, list[int]] = {}
  for op in collective_ops(hlo_text):
    entry = found.setdefault(op["kind"], [0, 0])
    entry[0] += 1
    entry[1] += op["bytes"]
  return sorted(({"kind": k, "count": c, "bytes": b} for k, (c, b) in found.items()), key=lambda e: -e["bytes"])


def summarize_error(exc: BaseException, limit: int = 300) -> str:
  """One line from a compile error: the out-of-memory sentence if there is one, else the first line."""
  text = str(exc).strip() or type(exc).__name__
  m = re.search(r"(RESOURCE_EXHAUSTED: )?Ran out of memory[^\n]*", text)
  line = m.group(0) if m else text.splitlines()[0]
  line = re.sub(r"\s+", " ", line).strip()
  return line if len(line) <= limit else line[:limit - 3] + "..."


def is_out_of_memory(exc: BaseException) -> bool:
  text = str(exc)
  return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "out of memory" in text.lower()
