"""Checks on values from the file before they are hashed or used as numbers."""
from __future__ import annotations

from typing import Any

from vfocal_jax.convert.pth.errors import CheckpointFormatError
from vfocal_jax.convert.pth.values import Frozen, InertObject, describe, is_inert_class

MAX_NDIM = 64
INT_KEY_BOUND = 2**61 - 1  # ints below this hash to themselves: no forced collisions
_SHALLOW_KEY_TYPES = (str, bytes, bool, type(None))


def key_ok(key: Any) -> bool:
  """Whether `key` may be hashed: bounded cost, and no attacker-chosen hash collisions."""
  t = type(key)
  if t is str or t is bytes or t is bool or key is None or t is float:
    return True
  if t is int:
    return -INT_KEY_BOUND < key < INT_KEY_BOUND
  if t is tuple or t is frozenset:
    return len(key) <= 64 and all(type(k) in _SHALLOW_KEY_TYPES for k in key)
  return isinstance(key, (InertObject, Frozen)) or is_inert_class(key)


def check_key(key: Any, what: str = "dict key") -> None:
  if not key_ok(key):
    raise CheckpointFormatError(
        f"{what} {describe(key)} is not accepted (keys and set elements must be str, bytes, "
        "int, float, bool, None, or flat tuples of str/bytes)")


def need_args(args: tuple, lo: int, hi: int, name: str) -> None:
  if not lo <= len(args) <= hi:
    raise CheckpointFormatError(f"{name} called with {len(args)} arguments")


def to_int(value: Any, what: str, lo: int = 0, hi: int = 2**62) -> int:
  if type(value) is not int or not lo <= value < hi:
    raise CheckpointFormatError(f"malformed {what}: {describe(value)}")
  return value


def int_tuple(value: Any, what: str) -> tuple[int, ...]:
  if type(value) not in (tuple, list) or len(value) > MAX_NDIM:
    raise CheckpointFormatError(f"malformed tensor {what}: {describe(value)}")
  return tuple(to_int(v, f"tensor {what}") for v in value)
