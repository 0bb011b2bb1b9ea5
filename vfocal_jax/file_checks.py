"""Checks for the files users hand us: one error naming the file and the field, never a traceback.

Model cards, ``dataset_info.json``, label maps and configs travel between
machines and teams, so they arrive truncated, hand-edited or written by other
tools. Every reader parses its file into plain values through these helpers,
which raise ``errors.BadFileError`` (a user error: one line, exit status 2) that reads
``<path>: <field> <what is wrong>``.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from vfocal_jax.errors import BadFileError

__all__ = ["BadFileError", "MAX_TEXT_BYTES", "parse_json", "decode_text", "mapping", "integer", "number",
           "boolean", "choice", "string", "sequence", "numbers", "integers", "strings", "csv_rows", "printable"]

MAX_TEXT_BYTES = 64 << 20  # A JSON or text file we read whole (cards, dataset_info, labels): 64 MiB at most.
_MAX_DEPTH = 64


def decode_text(data: bytes, path: Any) -> str:
  """``data`` as UTF-8 text, or an error naming the file (binary garbage, another encoding, too large)."""
  if len(data) > MAX_TEXT_BYTES:
    raise BadFileError(path, f"{len(data):,} bytes, more than the {MAX_TEXT_BYTES:,} a text file may have here")
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise BadFileError(path, f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
  if "\x00" in text:
    raise BadFileError(path, f"not a text file (a NUL byte at offset {text.index(chr(0))})")
  return text


def _depth(value: Any, limit: int) -> int:
  stack, deepest = [(value, 1)], 1
  while stack:
    node, d = stack.pop()
    deepest = max(deepest, d)
    if d > limit:
      return d
    if isinstance(node, dict):
      stack.extend((v, d + 1) for v in node.values())
    elif isinstance(node, list):
      stack.extend((v, d + 1) for v in node)
  return deepest


def parse_json(data: bytes | str, path: Any) -> Any:
  """The JSON value of a file's contents, or an error naming the file and where the JSON breaks."""
  text = decode_text(data, path) if isinstance(data, bytes) else data
  if not text.strip():
    raise BadFileError(path, "empty file, expected JSON")
  try:
    value = json.loads(text, parse_constant=lambda c: _raise_constant(c, path))
  except json.JSONDecodeError as e:
    raise BadFileError(path, f"not valid JSON ({e.msg.removesuffix(' at')} at line {e.lineno} column {e.colno}); "
                             "the file may be truncated or hand-edited") from None
  except RecursionError:
    raise BadFileError(path, f"JSON nested more than {_MAX_DEPTH} levels deep") from None
  except BadFileError:
    raise
  except ValueError as e:  # An integer of more than 4,300 digits (Python's limit on int(str)).
    raise BadFileError(path, f"not valid JSON ({' '.join(str(e).split())[:120]})") from None
  if _depth(value, _MAX_DEPTH) > _MAX_DEPTH:
    raise BadFileError(path, f"JSON nested more than {_MAX_DEPTH} levels deep")
  return value


def _raise_constant(constant: str, path: Any):
  raise BadFileError(path, f"JSON holds {constant}, which is not a number")


# --- Typed fields. ------------------------------------------------------------------------------

def _kind(value: Any) -> str:
  return {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}.get(
      type(value), type(value).__name__)


def _show(value: Any) -> str:
  """``null``, ``true/false True``, ``a string 'x'``: the kind of a wrong value, and the value (short)."""
  return "null" if value is None else f"{_kind(value)} {value!r:.40}"


def mapping(value: Any, path: Any, field: str = "the file") -> Mapping[str, Any]:
  if not isinstance(value, dict):
    raise BadFileError(path, f"{field} is {_kind(value)}, expected a JSON object")
  return value


def integer(value: Any, path: Any, field: str, *, lo: int | None = None, hi: int | None = None) -> int:
  """An int (JSON has no other kind: 3.0 and "3" are refused) within [lo, hi]."""
  if isinstance(value, bool) or not isinstance(value, int):
    raise BadFileError(path, f"{field} is {_show(value)}, expected an integer")
  if (lo is not None and value < lo) or (hi is not None and value > hi):
    raise BadFileError(path, f"{field} is {value}, expected {_bounds(lo, hi)}")
  return value


def number(value: Any, path: Any, field: str, *, lo: float | None = None, hi: float | None = None,
           positive: bool = False) -> float:
  """A finite int or float within [lo, hi] (and > 0 if ``positive``)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise BadFileError(path, f"{field} is {_show(value)}, expected a finite number")
  if positive and value <= 0:
    raise BadFileError(path, f"{field} is {value}, expected a number > 0")
  if (lo is not None and value < lo) or (hi is not None and value > hi):
    raise BadFileError(path, f"{field} is {value}, expected {_bounds(lo, hi)}")
  return float(value)


def boolean(value: Any, path: Any, field: str) -> bool:
  if not isinstance(value, bool):
    raise BadFileError(path, f"{field} is {_show(value)}, expected true or false")
  return value


def string(value: Any, path: Any, field: str, *, max_len: int = 4096) -> str:
  if not isinstance(value, str):
    raise BadFileError(path, f"{field} is {_kind(value)}, expected a string")
  if len(value) > max_len:
    raise BadFileError(path, f"{field} is a string of {len(value):,} characters, at most {max_len:,} expected")
  return value


def choice(value: Any, path: Any, field: str, options: Sequence[str]) -> str:
  if value not in options:
    raise BadFileError(path, f"{field} is {value!r:.60}, expected one of {', '.join(map(repr, options))}")
  return value


def sequence(value: Any, path: Any, field: str, *, length: int | None = None, max_len: int = 1 << 20) -> list:
  """A JSON list (of anything) with ``length`` items, or at most ``max_len``."""
  return _sequence(value, path, field, length, max_len)


def _sequence(value: Any, path: Any, field: str, length: int | None, max_len: int) -> list:
  if not isinstance(value, (list, tuple)):
    raise BadFileError(path, f"{field} is {_show(value)}, expected a list")
  if length is not None and len(value) != length:
    raise BadFileError(path, f"{field} has {len(value)} value{'s' * (len(value) != 1)}, expected {length}")
  if len(value) > max_len:
    raise BadFileError(path, f"{field} has {len(value):,} values, at most {max_len:,} expected")
  return list(value)


def numbers(value: Any, path: Any, field: str, *, length: int | None = None, max_len: int = 1 << 20,
            **bounds: Any) -> tuple[float, ...]:
  items = _sequence(value, path, field, length, max_len)
  return tuple(number(v, path, f"{field}[{i}]", **bounds) for i, v in enumerate(items))


def integers(value: Any, path: Any, field: str, *, length: int | None = None, max_len: int = 1 << 20,
             **bounds: Any) -> tuple[int, ...]:
  items = _sequence(value, path, field, length, max_len)
  return tuple(integer(v, path, f"{field}[{i}]", **bounds) for i, v in enumerate(items))


def strings(value: Any, path: Any, field: str, *, length: int | None = None, max_len: int = 1 << 20
            ) -> tuple[str, ...]:
  items = _sequence(value, path, field, length, max_len)
  return tuple(string(v, path, f"{field}[{i}]") for i, v in enumerate(items))


def _bounds(lo: float | None, hi: float | None) -> str:
  if lo is not None and hi is not None:
    return f"a value from {lo} to {hi}"
  return f"a value >= {lo}" if lo is not None else f"a value <= {hi}"


def csv_rows(text: str, path: Any) -> list[tuple[int, list[str]]]:
  """``(line number, cells)`` of the rows that are not blank or ``#`` comments; a CSV error names the line."""
  rows = []
  reader = csv.reader(io.StringIO(text))
  try:
    for row in reader:
      if any(c.strip() for c in row) and not row[0].lstrip().startswith("#"):
        rows.append((reader.line_num, [c.strip() for c in row]))
  except csv.Error as e:
    raise BadFileError(path, f"line {max(reader.line_num, 1)} is not CSV ({e})") from None
  return rows


def printable(cell: str, path: Any, line: int, what: str) -> str:
  """``cell`` of line ``line``, if it holds no control characters and at most 4,096 characters."""
  bad = next((c for c in cell if ord(c) < 32 and c != "\t" or ord(c) == 127), None)
  if bad is not None:
    raise BadFileError(path, f"line {line}: the {what} holds the control character {bad!r}; is this a text file?")
  if len(cell) > 4096:
    raise BadFileError(path, f"line {line}: the {what} is {len(cell):,} characters long; is this a list of videos?")
  return cell
