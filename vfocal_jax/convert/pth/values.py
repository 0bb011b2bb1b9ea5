"""What the pickle machine builds besides plain data, and how error messages describe values.

* `InertObject`: an instance of a global that is not allow-listed (data only;
  calling such a global is refused by its metaclass).
* `TorchDtype`, `StorageType`, `Global`: the immutable values that allow-listed
  globals resolve to.
* `StorageRef`, `PendingTensor`, `NumpyDtype`, `NumpyArray`: placeholders that
  the graph step (`graph.finish`) replaces once the storages have been read.
"""
from __future__ import annotations

import collections
from typing import Any, Callable

import numpy as np

from vfocal_jax.convert.pth.errors import UnsafeCheckpointError, clip


class InertMeta(type):
  """Metaclass of placeholders: instances come from NEWOBJ-like opcodes; calling is refused."""

  def __call__(cls, *args, **kwargs):
    raise UnsafeCheckpointError(
        f"asks to call {clip(cls._pickle_global, 200)}{describe_args(args)}, which is not on "
        "the allow-list of this loader")


class InertObject(metaclass=InertMeta):
  """Stand-in for an instance of a class the loader does not import (data only).

  Attributes:
    new_args: the positional arguments NEWOBJ passed to `cls.__new__`.
    new_kwargs: the keyword arguments of NEWOBJ_EX (usually empty).
    state: what BUILD passed (usually the object's `__dict__`).
    items: entries added by SETITEM(S) (dict subclasses such as yacs `CfgNode`).
    elements: entries added by APPEND(S) (list subclasses).
  """
  _pickle_global = "?"

  def __repr__(self) -> str:
    return f"<inert {clip(self._pickle_global, 120)}>"


def is_inert_class(obj: Any) -> bool:
  return isinstance(obj, type) and issubclass(obj, InertObject)


class Frozen:
  """Immutable: a file cannot change what an allow-listed name means."""
  __slots__ = ()

  def __setattr__(self, name, value):
    raise AttributeError(f"{type(self).__name__} is immutable")

  __delattr__ = __setattr__


class TorchType(Frozen):
  """A torch name that stands for a NumPy dtype."""
  __slots__ = ("name", "dtype")

  def __init__(self, name: str, dtype: Any):
    object.__setattr__(self, "name", name)
    object.__setattr__(self, "dtype", np.dtype(dtype))

  def __repr__(self) -> str:
    return f"torch.{self.name}"


class TorchDtype(TorchType):
  """What `torch.float32` & co. unpickle to."""
  __slots__ = ()


class StorageType(TorchType):
  """What `torch.FloatStorage` & co. unpickle to: only a dtype."""
  __slots__ = ()


class Global(Frozen):
  """An allow-listed callable global: `handler(machine, args)` rebuilds its result."""
  __slots__ = ("qualname", "handler", "kind")

  def __init__(self, qualname: str, handler: Callable, kind: str = "function"):
    object.__setattr__(self, "qualname", qualname)
    object.__setattr__(self, "handler", handler)
    object.__setattr__(self, "kind", kind)

  def __repr__(self) -> str:
    return f"<allow-listed {self.qualname}>"


class StorageRef:
  """A storage of the file: key, dtype and element count (its bytes are read later)."""
  __slots__ = ("key", "dtype", "numel", "nbytes", "record")

  def __init__(self, key: str, dtype: np.dtype, numel: int, record: Any = None):
    self.key, self.dtype, self.numel = key, dtype, numel
    self.nbytes = numel * dtype.itemsize
    self.record = record


class PendingTensor:
  """A validated tensor view of a storage; materialised once the storage is read."""
  __slots__ = ("storage", "dtype", "offset", "size", "stride", "whole")

  def __init__(self, storage, dtype, offset, size, stride, whole):
    self.storage, self.dtype, self.offset = storage, dtype, offset
    self.size, self.stride, self.whole = size, stride, whole


class NumpyDtype:
  """`numpy.dtype(...)` rebuilt as data; BUILD sets its byte order."""
  __slots__ = ("dtype",)

  def __init__(self, dtype: np.dtype):
    self.dtype = dtype


class NumpyArray:
  """`numpy.core.multiarray._reconstruct(...)`; BUILD fills `array` from raw bytes."""
  __slots__ = ("array",)

  def __init__(self):
    self.array = None


PLACEHOLDERS = (PendingTensor, StorageRef, NumpyDtype, NumpyArray)


def describe(obj: Any) -> str:
  """A short description of a value from the file; never a full repr of a large object."""
  t = type(obj)
  if obj is None or t is bool or t is float:
    return repr(obj)
  if t is int:
    return str(obj) if obj.bit_length() <= 64 else f"an int of {obj.bit_length()} bits"
  if t is str:
    return repr(obj[:60]) + (f"... ({len(obj)} chars)" if len(obj) > 60 else "")
  if t is bytes or t is bytearray:
    return repr(bytes(obj[:40])) + (f"... ({len(obj)} bytes)" if len(obj) > 40 else "")
  if t in (list, tuple, dict, set, frozenset, collections.OrderedDict):
    return f"a {t.__name__} of {len(obj)} items"
  if isinstance(obj, InertObject):
    return f"an instance of {clip(t._pickle_global, 120)}"
  if is_inert_class(obj):
    return f"the class {clip(obj._pickle_global, 120)}"
  if isinstance(obj, Global):
    return obj.qualname
  if isinstance(obj, TorchType):
    return f"torch.{obj.name}"
  if isinstance(obj, PendingTensor):
    return "a tensor"
  if isinstance(obj, StorageRef):
    return "a tensor storage"
  return f"a {t.__name__}"


def describe_args(args: tuple) -> str:
  parts = [describe(a) for a in args[:4]]
  if len(args) > 4:
    parts.append(f"... {len(args)} arguments")
  return clip("(" + ", ".join(parts) + ")", 300)
