"""Reads PyTorch `.pth` checkpoints with NumPy only: no torch, no code from the file.

A `.pth` file is a pickle, and unpickling normally imports and calls whatever
the file names. This module never hands the file to `pickle`: it runs its own
pickle machine, which

* rebuilds tensors with re-implementations of the few functions torch pickles
  (`torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`, ...) and reads
  their bytes from the archive (`<folder>/data/<key>` in the zip format; the
  storages after the pickles in the legacy format);
* rebuilds plain containers (dict, OrderedDict, list, tuple, set, ...) and a
  few data types (NumPy scalars and arrays, `torch.Size`, dtypes);
* turns every other global (a yacs `CfgNode`, an `argparse.Namespace`, any
  class of a library that is not installed) into an inert placeholder class:
  the pickle may *create* an instance of it and fill its state, which stores
  data and runs nothing;
* refuses, with `UnsafeCheckpointError` naming it, any attempt to *call* a
  global that is not allow-listed (`os.system`, `builtins.eval`, ...).

The machine is bounded by design (see docs/pth_loader.md): limits on the
pickle's size, nesting depth, memo, object count and on the bytes of tensor
data (checked while inflating, before anything is allocated); allow-listed
objects cannot be modified by a file and every load starts from fresh state;
the archive is read as torch reads it (one archive folder, unique entry names,
`byteorder` exactly `little` or `big`; legacy files that are also zip or tar
archives are refused). Every refusal is a `CheckpointLoadError` whose message
starts with the file name and is bounded in length.

Typical use: `state_dict = load_torch_checkpoint("video-focalnet_tiny.pth")`.
Paths may be local or `gs://...` (opened with `etils.epath`).
"""
from __future__ import annotations

import codecs
import collections
import itertools
import logging
import math
import mmap
import os
import pickle
import pickletools
import re
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import ml_dtypes
import numpy as np

__all__ = [
    "CheckpointLoadError", "CheckpointFormatError", "CheckpointLimitError",
    "UnsafeCheckpointError", "InertObject", "load_torch_checkpoint", "read_torch_file",
    "extract_state_dict", "MAX_PICKLE_BYTES", "MAX_DEPTH", "MAX_MEMO", "MAX_OBJECTS",
    "MAX_TENSOR_BYTES", "TENSOR_BYTES_PER_FILE_BYTE", "MIN_TENSOR_BYTES", "MAX_ZIP_ENTRIES",
]

# ---------------------------------------------------------------------------
# Limits (module defaults; every one can be overridden per call by keyword).

MAX_PICKLE_BYTES = 256 * 2**20
"""Bytes of pickle: `data.pkl` of a zip archive, or all pickles of a legacy file."""
MAX_DEPTH = 256
"""Container nesting depth of the unpickled object."""
MAX_MEMO = 1_000_000
"""Entries in the pickle memo."""
MAX_OBJECTS = 4_000_000
"""Objects created and container slots filled while unpickling (a set, a
placeholder instance or a placeholder class counts as several)."""
MAX_TENSOR_BYTES = 64 * 2**30
"""Absolute cap on the bytes of tensor data: storages read (after inflating)
plus the copies that strided views need."""
TENSOR_BYTES_PER_FILE_BYTE = 4
"""By default the tensor data may also be at most this many times the file
size (or MIN_TENSOR_BYTES, whichever is larger): a small file cannot claim
gigabytes through a compressed record or stride-0 views."""
MIN_TENSOR_BYTES = 256 * 2**20
MAX_ZIP_ENTRIES = 100_000
"""Entries in the zip archive's central directory."""

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_MAX_NDIM = 64
_MAX_NAME = 1000  # characters of a global's module or name
_CHUNK = 8 * 2**20


class _Limits(NamedTuple):
  max_pickle_bytes: int
  max_depth: int
  max_memo: int
  max_objects: int
  max_tensor_bytes: int | None  # None: the file-size rule
  max_zip_entries: int


# ---------------------------------------------------------------------------
# Errors.


def _clip(text: str, n: int = 300) -> str:
  return text if len(text) <= n else text[:n] + f"... ({len(text)} chars)"


class CheckpointLoadError(ValueError, pickle.UnpicklingError):
  """The file cannot be read as a PyTorch checkpoint (base class of every refusal).

  The message is `"<path>: <reason>"`, bounded in length. Attributes:
  `path` (the file, None until known) and `reason`.
  """

  def __init__(self, reason: str, path: str | None = None):
    self.reason = _clip(str(reason), 2000)
    self.path = path
    super().__init__(self._text())

  def _text(self) -> str:
    return f"{_clip(self.path, 1000)}: {self.reason}" if self.path else self.reason

  def with_path(self, path: str) -> "CheckpointLoadError":
    if self.path is None:
      self.path = path
      self.args = (self._text(),)
    return self

  def __str__(self) -> str:
    return self._text()

  def __reduce__(self):
    return (type(self), (self.reason, self.path))


class CheckpointFormatError(CheckpointLoadError):
  """Malformed, truncated or unsupported file; or a construct torch would read differently."""


class CheckpointLimitError(CheckpointLoadError):
  """The file exceeds one of the loader's limits (`limit` names the keyword that raises it)."""

  def __init__(self, reason: str, path: str | None = None, limit: str | None = None):
    self.limit = limit
    super().__init__(reason, path)

  def __reduce__(self):
    return (type(self), (self.reason, self.path, self.limit))


class UnsafeCheckpointError(CheckpointLoadError):
  """The pickle asked to call a function that is not on the allow-list (nothing was run)."""


def _limit_error(limit: str, value: int, what: str) -> CheckpointLimitError:
  return CheckpointLimitError(
      f"{what} exceeds {limit}={value:,} (pass {limit}=... to read_torch_file / "
      "load_torch_checkpoint if you trust this file)", limit=limit)


def _describe(obj: Any) -> str:
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
    return f"an instance of {_clip(t._pickle_global, 120)}"
  if isinstance(obj, type) and issubclass(obj, InertObject):
    return f"the class {_clip(obj._pickle_global, 120)}"
  if isinstance(obj, _Global):
    return obj.qualname
  if isinstance(obj, (_TorchDtype, _StorageType)):
    return f"torch.{obj.name}"
  if isinstance(obj, _PendingTensor):
    return "a tensor"
  if isinstance(obj, _StorageRef):
    return "a tensor storage"
  return f"a {t.__name__}"


def _describe_args(args: tuple) -> str:
  parts = [_describe(a) for a in args[:4]]
  if len(args) > 4:
    parts.append(f"... {len(args)} arguments")
  return _clip("(" + ", ".join(parts) + ")", 300)


# ---------------------------------------------------------------------------
# Inert placeholders for globals we do not import (one class per global and load).


class _InertMeta(type):
  """Metaclass of placeholders: instances come from NEWOBJ-like opcodes; calling is refused."""

  def __call__(cls, *args, **kwargs):
    raise UnsafeCheckpointError(
        f"asks to call {_clip(cls._pickle_global, 200)}{_describe_args(args)}, which is not on "
        "the allow-list of this loader")


class InertObject(metaclass=_InertMeta):
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
    return f"<inert {_clip(self._pickle_global, 120)}>"


# ---------------------------------------------------------------------------
# Immutable values that allow-listed globals resolve to.


class _Frozen:
  __slots__ = ()

  def __setattr__(self, name, value):
    raise AttributeError(f"{type(self).__name__} is immutable")

  __delattr__ = __setattr__


class _TorchDtype(_Frozen):
  """What `torch.float32` & co. unpickle to."""
  __slots__ = ("name", "dtype")

  def __init__(self, name: str, dtype: Any):
    object.__setattr__(self, "name", name)
    object.__setattr__(self, "dtype", np.dtype(dtype))

  def __repr__(self) -> str:
    return f"torch.{self.name}"


class _StorageType(_Frozen):
  """What `torch.FloatStorage` & co. unpickle to: only a dtype."""
  __slots__ = ("name", "dtype")

  def __init__(self, name: str, dtype: Any):
    object.__setattr__(self, "name", name)
    object.__setattr__(self, "dtype", np.dtype(dtype))

  def __repr__(self) -> str:
    return f"torch.{self.name}"


class _Global(_Frozen):
  """An allow-listed callable global: `handler(machine, args)` rebuilds its result."""
  __slots__ = ("qualname", "handler", "kind")

  def __init__(self, qualname: str, handler: Callable, kind: str = "function"):
    object.__setattr__(self, "qualname", qualname)
    object.__setattr__(self, "handler", handler)
    object.__setattr__(self, "kind", kind)

  def __repr__(self) -> str:
    return f"<allow-listed {self.qualname}>"


# ---------------------------------------------------------------------------
# Placeholders resolved after the pickle has been read (no code runs then either).


class _StorageRef:
  """A storage of the file: key, dtype and element count (its bytes are read later)."""
  __slots__ = ("key", "dtype", "numel", "nbytes", "record")

  def __init__(self, key: str, dtype: np.dtype, numel: int, record: Any = None):
    self.key, self.dtype, self.numel = key, dtype, numel
    self.nbytes = numel * dtype.itemsize
    self.record = record


class _PendingTensor:
  """A validated tensor view of a storage; materialised once the storage is read."""
  __slots__ = ("storage", "dtype", "offset", "size", "stride", "whole")

  def __init__(self, storage, dtype, offset, size, stride, whole):
    self.storage, self.dtype, self.offset = storage, dtype, offset
    self.size, self.stride, self.whole = size, stride, whole


class _NumpyDtype:
  """`numpy.dtype(...)` rebuilt as data; BUILD sets its byte order."""
  __slots__ = ("dtype",)

  def __init__(self, dtype: np.dtype):
    self.dtype = dtype


class _NumpyArray:
  """`numpy.core.multiarray._reconstruct(...)`; BUILD fills `array` from raw bytes."""
  __slots__ = ("array",)

  def __init__(self):
    self.array = None


_PLACEHOLDERS = (_PendingTensor, _StorageRef, _NumpyDtype, _NumpyArray)

# ---------------------------------------------------------------------------
# The allow-list.

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}

_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16,
    "short": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
    "complex64": np.complex64, "cfloat": np.complex64, "complex128": np.complex128,
    "cdouble": np.complex128, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
}

_INT_KEY_BOUND = 2**61 - 1  # ints below this hash to themselves: no forced collisions
_SHALLOW_KEY_TYPES = (str, bytes, bool, type(None))


def _key_ok(key: Any) -> bool:
  """Whether `key` may be hashed: bounded cost, and no attacker-chosen hash collisions."""
  t = type(key)
  if t is str or t is bytes or t is bool or key is None or t is float:
    return True
  if t is int:
    return -_INT_KEY_BOUND < key < _INT_KEY_BOUND
  if t is tuple or t is frozenset:
    return len(key) <= 64 and all(type(k) in _SHALLOW_KEY_TYPES for k in key)
  return isinstance(key, (InertObject, _Frozen)) or (
      isinstance(key, type) and issubclass(key, InertObject))


def _check_key(m: "_Machine", key: Any, what: str = "dict key") -> None:
  if not _key_ok(key):
    raise CheckpointFormatError(
        f"{what} {_describe(key)} is not accepted (keys and set elements must be str, bytes, "
        "int, float, bool, None, or flat tuples of str/bytes)")


def _need_args(args: tuple, lo: int, hi: int, name: str) -> None:
  if not lo <= len(args) <= hi:
    raise CheckpointFormatError(f"{name} called with {len(args)} arguments")


def _int(value: Any, what: str, lo: int = 0, hi: int = 2**62) -> int:
  if type(value) is not int or not lo <= value < hi:
    raise CheckpointFormatError(f"malformed {what}: {_describe(value)}")
  return value


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
  if type(value) not in (tuple, list) or len(value) > _MAX_NDIM:
    raise CheckpointFormatError(f"malformed tensor {what}: {_describe(value)}")
  return tuple(_int(v, f"tensor {what}") for v in value)


def _elements(m: "_Machine", value: Any, what: str) -> list:
  """The items of an already materialised container (never a lazy iterable like range)."""
  if type(value) in (list, tuple, set, frozenset):
    m.units(len(value))
    return list(value)
  if type(value) in (dict, collections.OrderedDict):
    m.units(len(value))
    return list(value)
  raise CheckpointFormatError(f"{what} of {_describe(value)} is not rebuilt")


def _h_list(m, args):
  _need_args(args, 0, 1, "list")
  return _elements(m, args[0], "list") if args else []


def _h_tuple(m, args):
  _need_args(args, 0, 1, "tuple")
  return tuple(_elements(m, args[0], "tuple")) if args else ()


def _h_set(m, args, ctor=set):
  _need_args(args, 0, 1, ctor.__name__)
  items = _elements(m, args[0], ctor.__name__) if args else []
  for item in items:
    _check_key(m, item, "set element")
  m.units(4)
  return ctor(items)


def _h_frozenset(m, args):
  return _h_set(m, args, frozenset)


def _h_dict(m, args, ctor=dict):
  _need_args(args, 0, 1, ctor.__name__)
  out = ctor()
  m.units(2)
  if args:
    source = args[0]
    if type(source) in (dict, collections.OrderedDict):
      pairs = list(source.items())
    elif type(source) in (list, tuple):
      pairs = source
    else:
      raise CheckpointFormatError(f"{ctor.__name__} of {_describe(source)} is not rebuilt")
    m.units(len(pairs))
    for pair in pairs:
      if type(pair) not in (tuple, list) or len(pair) != 2:
        raise CheckpointFormatError(f"{ctor.__name__} item {_describe(pair)} is not a pair")
      _check_key(m, pair[0])
      out[pair[0]] = pair[1]
  return out


def _h_ordered_dict(m, args):
  return _h_dict(m, args, collections.OrderedDict)


def _small_number(value: Any, what: str) -> Any:
  if type(value) is float or type(value) is bool or (
      type(value) is int and value.bit_length() <= 1024):
    return value
  raise CheckpointFormatError(f"{what} argument {_describe(value)} is not rebuilt")


def _h_complex(m, args):
  _need_args(args, 0, 2, "complex")
  return complex(*(_small_number(a, "complex") for a in args))


def _h_slice(m, args):
  _need_args(args, 1, 3, "slice")
  for a in args:
    if a is not None:
      _int(a, "slice argument", -2**63, 2**63)
  return slice(*args)


def _h_range(m, args):
  _need_args(args, 1, 3, "range")
  return range(*(_int(a, "range argument", -2**63, 2**63) for a in args))


_TEXT_ENCODINGS = ("latin1", "latin-1", "iso-8859-1", "utf-8", "utf8", "ascii")


def _h_codecs_encode(m, args):
  _need_args(args, 1, 3, "_codecs.encode")
  text = args[0]
  encoding = args[1] if len(args) > 1 else "utf-8"
  errors = args[2] if len(args) > 2 else "strict"
  if type(text) is not str or encoding not in _TEXT_ENCODINGS or errors not in ("strict",):
    raise CheckpointFormatError(f"_codecs.encode{_describe_args(args)} is not rebuilt")
  return text.encode(encoding, errors)


def _h_bytes_like(m, args, ctor):
  _need_args(args, 0, 2, ctor.__name__)
  if not args:
    return ctor()
  if len(args) == 1 and type(args[0]) in (bytes, bytearray):
    return ctor(args[0])
  if len(args) == 2 and type(args[0]) is str:
    return ctor(_h_codecs_encode(m, args))
  raise CheckpointFormatError(f"{ctor.__name__}{_describe_args(args)} is not rebuilt")


def _h_bytearray(m, args):
  return _h_bytes_like(m, args, bytearray)


def _h_bytes(m, args):
  return _h_bytes_like(m, args, bytes)


def _inert_class_arg(cls: Any, what: str) -> type:
  if not (isinstance(cls, type) and issubclass(cls, InertObject)):
    raise UnsafeCheckpointError(f"{what} of {_describe(cls)} is not allowed")
  return cls


def _h_reconstructor(m, args):
  """Protocol 0/1 object reconstruction, for placeholder classes only."""
  _need_args(args, 3, 3, "copyreg._reconstructor")
  return m.new_inert(_inert_class_arg(args[0], "copyreg._reconstructor"), args[1:], {})


def _h_copyreg_newobj(m, args):
  _need_args(args, 1, 1 + 2**16, "copyreg.__newobj__")
  return m.new_inert(_inert_class_arg(args[0], "copyreg.__newobj__"), args[1:], {})


def _h_torch_size(m, args):
  _need_args(args, 0, 1, "torch.Size")
  return _int_tuple(args[0], "size") if args else ()


def _h_torch_device(m, args):
  _need_args(args, 1, 2, "torch.device")
  if type(args[0]) is not str or len(args[0]) > 64:
    raise CheckpointFormatError(f"torch.device{_describe_args(args)} is not rebuilt")
  if len(args) == 2:
    return f"{args[0]}:{_int(args[1], 'device index', 0, 2**16)}"
  return args[0]


# Tensors.


def _contiguous(size: tuple, stride: tuple) -> bool:
  expected = 1
  for n, s in zip(reversed(size), reversed(stride)):
    if n != 1 and s != expected:
      return False
    expected *= n
  return True


def _tensor(m, storage, offset, size, stride, dtype=None) -> _PendingTensor:
  if not isinstance(storage, _StorageRef):
    raise CheckpointFormatError(f"expected a tensor storage, got {_describe(storage)}")
  if dtype is None:
    dtype = storage.dtype
  elif isinstance(dtype, _TorchDtype):
    dtype = dtype.dtype
  else:
    raise CheckpointFormatError(f"malformed tensor dtype {_describe(dtype)}")
  offset = _int(offset, "tensor storage offset")
  size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
  if len(size) != len(stride):
    raise CheckpointFormatError(f"tensor size and stride differ in length ({len(size)} vs "
                                f"{len(stride)})")
  numel = math.prod(size)
  available = storage.nbytes // dtype.itemsize
  if numel:
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= available:
      raise CheckpointFormatError(
          f"tensor view reads element {last:,} of a storage of {available:,} elements")
  whole = (numel > 0 and offset == 0 and dtype == storage.dtype and numel == storage.numel
           and _contiguous(size, stride))
  if not whole:
    m.loader.charge_bytes(numel * dtype.itemsize, "tensor data (storages and view copies)")
  return _PendingTensor(storage, dtype, offset, size, stride, whole)


def _h_rebuild_tensor(m, args):
  _need_args(args, 4, 4, "torch._utils._rebuild_tensor")
  return _tensor(m, *args)


def _h_rebuild_tensor_v2(m, args):
  _need_args(args, 6, 7, "torch._utils._rebuild_tensor_v2")
  return _tensor(m, *args[:4])


def _h_rebuild_tensor_v3(m, args):
  _need_args(args, 7, 8, "torch._utils._rebuild_tensor_v3")
  return _tensor(m, *args[:4], dtype=args[6])


def _pending(value: Any, what: str) -> _PendingTensor:
  if not isinstance(value, _PendingTensor):
    raise CheckpointFormatError(f"{what} of {_describe(value)}: expected a tensor")
  return value


def _h_rebuild_parameter(m, args):
  _need_args(args, 1, 3, "torch._utils._rebuild_parameter")
  return _pending(args[0], "_rebuild_parameter")


def _h_rebuild_parameter_with_state(m, args):
  _need_args(args, 4, 4, "torch._utils._rebuild_parameter_with_state")
  return _pending(args[0], "_rebuild_parameter_with_state")


def _h_rebuild_from_type_v2(m, args):
  """Tensor subclasses: `func` must itself be an allow-listed tensor rebuild."""
  _need_args(args, 4, 4, "torch._tensor._rebuild_from_type_v2")
  func, _, fargs, _ = args
  if not (isinstance(func, _Global) and func.kind == "tensor"):
    raise UnsafeCheckpointError(
        f"_rebuild_from_type_v2 asks to call {_describe(func)}, which is not a tensor rebuild")
  if type(fargs) is not tuple:
    raise CheckpointFormatError(f"_rebuild_from_type_v2 arguments: {_describe(fargs)}")
  return func.handler(m, fargs)


# NumPy data inside checkpoints (e.g. a best-accuracy scalar).

_NUMPY_SPEC = re.compile(r"(b1|[iu][1248]|f[248]|c(8|16)|[SU][0-9]{1,6})")


def _h_np_dtype(m, args):
  _need_args(args, 1, 3, "numpy.dtype")
  spec = args[0]
  if type(spec) is not str or not _NUMPY_SPEC.fullmatch(spec):
    raise CheckpointFormatError(f"numpy dtype {_describe(spec)} is not rebuilt (only numeric, "
                                "bool and string dtypes)")
  return _NumpyDtype(np.dtype(spec))


def _np_dtype_arg(dtype: Any) -> np.dtype:
  if not isinstance(dtype, _NumpyDtype):
    raise CheckpointFormatError(f"expected a numpy dtype, got {_describe(dtype)}")
  return dtype.dtype


def _native(array: np.ndarray) -> np.ndarray:
  return array.astype(array.dtype.newbyteorder("="), copy=True)


def _h_np_scalar(m, args):
  _need_args(args, 1, 2, "numpy scalar")
  dtype = _np_dtype_arg(args[0])
  raw = args[1] if len(args) > 1 else None
  if type(raw) not in (bytes, bytearray) or len(raw) != dtype.itemsize:
    raise CheckpointFormatError("only numpy scalars of raw bytes are rebuilt")
  return _native(np.frombuffer(raw, dtype))[0]


def _h_np_reconstruct(m, args):
  _need_args(args, 3, 3, "numpy _reconstruct")
  return _NumpyArray()


def _np_array(raw: Any, dtype: np.dtype, shape: Any, fortran: bool) -> np.ndarray:
  shape = _int_tuple(shape, "numpy shape")
  if type(raw) not in (bytes, bytearray) or len(raw) != math.prod(shape) * dtype.itemsize:
    raise CheckpointFormatError("only numeric numpy arrays of raw bytes are rebuilt")
  return _native(np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C"))


def _h_np_frombuffer(m, args):
  _need_args(args, 4, 4, "numpy _frombuffer")
  buf, dtype, shape, order = args
  if order not in ("C", "F"):
    raise CheckpointFormatError(f"numpy array order {_describe(order)}")
  return _np_array(buf, _np_dtype_arg(dtype), shape, order == "F")


_TENSOR_HANDLERS = {
    "_rebuild_tensor": _h_rebuild_tensor, "_rebuild_tensor_v2": _h_rebuild_tensor_v2,
    "_rebuild_tensor_v3": _h_rebuild_tensor_v3, "_rebuild_parameter": _h_rebuild_parameter,
    "_rebuild_parameter_with_state": _h_rebuild_parameter_with_state,
}


def _allow_list() -> dict[tuple[str, str], Any]:
  table: dict[tuple[str, str], Any] = {}

  def add(module, name, handler, kind="function"):
    table[(module, name)] = _Global(f"{module}.{name}", handler, kind)

  add("collections", "OrderedDict", _h_ordered_dict, "container")
  for name, handler in [("dict", _h_dict), ("list", _h_list), ("tuple", _h_tuple),
                        ("set", _h_set), ("frozenset", _h_frozenset)]:
    add("builtins", name, handler, "container")
  for name, handler in [("complex", _h_complex), ("slice", _h_slice), ("range", _h_range),
                        ("bytearray", _h_bytearray), ("bytes", _h_bytes)]:
    add("builtins", name, handler)
  add("_codecs", "encode", _h_codecs_encode)
  add("copyreg", "_reconstructor", _h_reconstructor)
  add("copyreg", "__newobj__", _h_copyreg_newobj)
  for name, handler in _TENSOR_HANDLERS.items():
    add("torch._utils", name, handler, "tensor")
  add("torch._tensor", "_rebuild_from_type_v2", _h_rebuild_from_type_v2)
  add("torch", "Size", _h_torch_size)
  add("torch", "device", _h_torch_device)
  add("numpy", "dtype", _h_np_dtype)
  for core in ("numpy.core", "numpy._core"):
    add(f"{core}.multiarray", "scalar", _h_np_scalar)
    add(f"{core}.multiarray", "_reconstruct", _h_np_reconstruct)
    add(f"{core}.numeric", "_frombuffer", _h_np_frombuffer)
  for name, dtype in _STORAGE_DTYPES.items():
    for module in ("torch", "torch.cuda"):
      table[(module, name)] = _StorageType(name, dtype)
  table[("torch.storage", "UntypedStorage")] = table[("torch", "UntypedStorage")]
  for name, dtype in _TORCH_DTYPES.items():
    table[("torch", name)] = _TorchDtype(name, dtype)
  return table


_ALLOWED = _allow_list()
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}  # protocol-2 pickles use these
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_]")

# ---------------------------------------------------------------------------
# Per-load state.


class _Load:
  """State of one load: limits and counters shared by its pickles, placeholder classes, storages."""

  def __init__(self, limits: _Limits, file_size: int):
    self.limits = limits
    self.objects = 0
    self.inert: dict[tuple[str, str], type] = {}
    self.storages: dict[str, _StorageRef] = {}
    self.tensor_bytes = 0
    if limits.max_tensor_bytes is not None:
      self.tensor_budget = limits.max_tensor_bytes
    else:
      self.tensor_budget = min(MAX_TENSOR_BYTES,
                               max(MIN_TENSOR_BYTES, TENSOR_BYTES_PER_FILE_BYTE * file_size))
    self.storage_record: Callable[[str, np.dtype, int], Any] | None = None
    self.verify_crc = False
    self.select: Callable[[Any], Any] | None = None

  def charge_bytes(self, nbytes: int, what: str) -> None:
    self.tensor_bytes += nbytes
    if self.tensor_bytes > self.tensor_budget:
      raise _limit_error("max_tensor_bytes", self.tensor_budget, f"{what} ({self.tensor_bytes:,} bytes)")

  def inert_class(self, module: str, name: str) -> type:
    key = (module, name)
    cls = self.inert.get(key)
    if cls is None:
      self.charge_objects(16)
      class_name = _SAFE_NAME.sub("_", name)[:100] or "Inert"
      if not class_name[0].isalpha():
        class_name = "Inert_" + class_name
      cls = _InertMeta(class_name, (InertObject,),
                       {"_pickle_global": f"{module}.{name}", "__module__": __name__})
      self.inert[key] = cls
    return cls

  def charge_objects(self, n: int) -> None:
    self.objects += n
    if self.objects > self.limits.max_objects:
      raise _limit_error("max_objects", self.limits.max_objects, "objects created by the pickle")

  def storage(self, key: Any, storage_type: Any, numel: Any) -> _StorageRef:
    if type(key) is not str or not key or len(key) > 200:
      raise CheckpointFormatError(f"malformed storage key {_describe(key)}")
    if not isinstance(storage_type, _StorageType):
      raise CheckpointFormatError(f"unsupported storage type {_describe(storage_type)}")
    numel = _int(numel, "storage size")
    ref = self.storages.get(key)
    if ref is not None:
      if ref.dtype != storage_type.dtype or ref.numel != numel:
        raise CheckpointFormatError(
            f"storage {key!r} is referenced with two different types or sizes")
      return ref
    ref = _StorageRef(key, storage_type.dtype, numel)
    if self.storage_record is not None:
      ref.record = self.storage_record(key, storage_type.dtype, numel)
    self.charge_bytes(ref.nbytes, "tensor data (storages and view copies)")
    self.charge_objects(4)
    self.storages[key] = ref
    return ref


# ---------------------------------------------------------------------------
# Byte sources for the pickle machine.


class _Truncated(Exception):
  pass


def _read_exact(f: Any, n: int) -> bytes:
  parts, left = [], n
  while left > 0:
    chunk = f.read(min(left, _CHUNK))
    if not chunk:
      raise CheckpointFormatError(f"the file is truncated ({n - left:,} of {n:,} bytes read)")
    parts.append(chunk)
    left -= len(chunk)
  return b"".join(parts)


def _readinto_exact(f: Any, view: memoryview) -> None:
  got, n = 0, len(view)
  readinto = getattr(f, "readinto", None)
  while got < n:
    if readinto is not None:
      k = readinto(view[got:got + _CHUNK * 8])
    else:
      data = f.read(min(n - got, _CHUNK))
      k = len(data) if data else 0
      view[got:got + k] = data
    if not k:
      raise CheckpointFormatError(f"the file is truncated ({got:,} of {n:,} bytes read)")
    got += k


class _Source:
  """The bytes of one or more pickles: in memory, or from a file up to `end` (read in chunks)."""

  def __init__(self, data: bytes = b"", f: Any = None, start: int = 0, end: int = 0,
               limited: bool = False):
    self.buf, self.pos, self.f = data, 0, f
    self.base = start  # file offset of buf[0]
    self.end = len(data) if f is None else end
    self.limited = limited  # `end` is max_pickle_bytes, not the end of the file

  def tell(self) -> int:
    return self.base + self.pos

  def _fill(self, n: int) -> None:
    """Makes buf[pos:pos + n] available."""
    here = self.base + self.pos
    if here + n > self.end or self.f is None:
      if self.limited and here + n > self.end:
        raise _limit_error("max_pickle_bytes", self.end, "the pickle")
      raise _Truncated()
    rest = self.buf[self.pos:]
    want = min(max(n - len(rest), _CHUNK), self.end - self.base - len(self.buf))
    self.buf = rest + _read_exact(self.f, want)
    self.base, self.pos = here, 0

  def byte(self) -> int:
    if self.pos >= len(self.buf):
      self._fill(1)
    self.pos += 1
    return self.buf[self.pos - 1]

  def read(self, n: int) -> bytes:
    if self.pos + n > len(self.buf):
      self._fill(n)
    self.pos += n
    return self.buf[self.pos - n:self.pos]

  def readline(self) -> bytes:
    while True:
      i = self.buf.find(b"\n", self.pos)
      if i >= 0:
        line = self.buf[self.pos:i + 1]
        self.pos = i + 1
        return line
      self._fill(len(self.buf) - self.pos + 1)

  def skip(self, n: int) -> None:
    """Moves `n` bytes forward past the pickles (a storage nothing uses)."""
    k = min(n, len(self.buf) - self.pos)
    self.pos += k
    if k < n:
      self.base, self.buf, self.pos = self.base + self.pos + n - k, b"", 0
      self.f.seek(self.base)

  def readinto(self, view: memoryview) -> None:
    """Reads past the pickles (the legacy format's storages); not counted as pickle bytes."""
    k = min(len(view), len(self.buf) - self.pos)
    view[:k] = self.buf[self.pos:self.pos + k]
    self.pos += k
    if k < len(view):
      _readinto_exact(self.f, view[k:])
      self.base, self.buf, self.pos = self.base + self.pos + len(view) - k, b"", 0


# ---------------------------------------------------------------------------
# The pickle machine.

_STOP = object()
_OPS: dict[int, Callable[["_Machine"], Any]] = {}
_OP_NAMES: dict[int, str] = {}


_OP_NAMES.update({op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes})


def _op(code: bytes):
  def register(fn):
    _OPS[code[0]] = fn
    return fn
  return register


class _Machine:
  """Runs one pickle: a stack machine with pickle's opcodes and none of its imports."""

  def __init__(self, loader: _Load, src: _Source, persistent_load: Callable | None):
    self.loader, self.src, self.persistent_load = loader, src, persistent_load
    self.stack: list = []
    self.metastack: list = []
    self.memo: dict[int, Any] = {}
    self.result: Any = None

  def units(self, n: int) -> None:
    self.loader.charge_objects(n)

  def run(self) -> Any:
    src, ops, loader = self.src, _OPS, self.loader
    byte = src.byte
    max_objects = loader.limits.max_objects
    op = -1
    try:
      while True:
        op = byte()
        loader.objects += 1
        if loader.objects > max_objects:
          loader.charge_objects(0)
        fn = ops.get(op)
        if fn is None:
          raise CheckpointFormatError(f"unknown pickle opcode 0x{op:02x} near byte {src.tell():,}")
        if fn(self) is _STOP:
          return self.result
    except _Truncated:
      raise CheckpointFormatError(f"the pickle is truncated (near byte {src.tell():,})") from None
    except CheckpointLoadError:
      raise
    except (IndexError, KeyError, TypeError, ValueError, AttributeError, struct.error,
            UnicodeError, OverflowError, EOFError) as e:
      raise CheckpointFormatError(
          f"malformed pickle: opcode {_OP_NAMES.get(op, op)} near byte {src.tell():,} failed "
          f"({type(e).__name__})") from None

  # Helpers.

  def pop_mark(self) -> list:
    items = self.stack
    self.stack = self.metastack.pop()
    return items

  def new_inert(self, cls: type, args: tuple, kwargs: dict) -> InertObject:
    self.units(6)
    obj = object.__new__(cls)
    obj.new_args, obj.new_kwargs = tuple(args), dict(kwargs)
    obj.state, obj.items, obj.elements = None, {}, []
    return obj

  def find_class(self, module: Any, name: Any) -> Any:
    if type(module) is not str or type(name) is not str or not 0 < len(module) <= _MAX_NAME \
        or not 0 < len(name) <= _MAX_NAME:
      raise CheckpointFormatError(f"malformed global {_describe(module)} {_describe(name)}")
    module = _PY2_MODULES.get(module, module)
    allowed = _ALLOWED.get((module, name))
    if allowed is not None:
      return allowed
    return self.loader.inert_class(module, name)

  def call(self, func: Any, args: Any) -> Any:
    if type(args) is not tuple:
      raise CheckpointFormatError(f"call arguments are {_describe(args)}, not a tuple")
    if isinstance(func, _Global):
      return func.handler(self, args)
    if isinstance(func, type) and issubclass(func, InertObject):
      raise UnsafeCheckpointError(
          f"the pickle asks to call {_clip(func._pickle_global, 200)}{_describe_args(args)}, "
          "which is not on the allow-list of this loader (only tensors, plain containers and "
          "NumPy data are rebuilt). Nothing was executed. If you trust this file, load it with "
          "torch.load instead and save a plain state dict (torch.save(model.state_dict(), path)).")
    raise CheckpointFormatError(f"the pickle calls {_describe(func)}, which is not callable")

  def new_object(self, cls: Any, args: Any, kwargs: Any) -> Any:
    if type(args) is not tuple or type(kwargs) is not dict:
      raise CheckpointFormatError("malformed NEWOBJ arguments")
    if isinstance(cls, type) and issubclass(cls, InertObject):
      for key in kwargs:
        _check_key(self, key)
      return self.new_inert(cls, args, kwargs)
    if isinstance(cls, _Global) and cls.kind == "container" and not kwargs:
      if cls.qualname in ("builtins.tuple", "builtins.frozenset"):
        return cls.handler(self, args)
      return cls.handler(self, ())
    raise CheckpointFormatError(f"NEWOBJ on {_describe(cls)} is not allowed")

  def instantiate(self, cls: Any, args: list) -> Any:
    if isinstance(cls, type) and issubclass(cls, InertObject) and not args:
      return self.new_inert(cls, (), {})
    return self.call(cls, tuple(args))

  def memo_put(self, index: Any, value: Any) -> None:
    index = _int(index, "memo index", 0, 2**32)
    if index not in self.memo and len(self.memo) >= self.loader.limits.max_memo:
      raise _limit_error("max_memo", self.loader.limits.max_memo, "the pickle memo")
    self.memo[index] = value

  def memo_get(self, index: Any) -> Any:
    try:
      return self.memo[index]
    except (KeyError, TypeError):
      raise CheckpointFormatError(f"the pickle reads memo entry {_describe(index)}, "
                                  "which was never stored") from None

  def setitem(self, target: Any, key: Any, value: Any) -> None:
    _check_key(self, key)
    t = type(target)
    if t is dict or t is collections.OrderedDict:
      target[key] = value
    elif isinstance(target, InertObject):
      target.items[key] = value
    else:
      raise CheckpointFormatError(f"SETITEM on {_describe(target)} is not allowed")

  def append(self, target: Any, values: list) -> None:
    if type(target) is list:
      target.extend(values)
    elif isinstance(target, InertObject):
      target.elements.extend(values)
    else:
      raise CheckpointFormatError(f"APPEND on {_describe(target)} is not allowed")

  def build(self, target: Any, state: Any) -> None:
    if isinstance(target, InertObject):
      target.state = state
    elif type(target) is collections.OrderedDict:
      # `state_dict()` carries `_metadata` (version numbers); nothing else is set.
      if type(state) is tuple and len(state) == 2 and state[1] is None:
        state = state[0]
      if type(state) is not dict or any(k != "_metadata" for k in state):
        raise CheckpointFormatError(f"BUILD of an OrderedDict with {_describe(state)}")
      if "_metadata" in state:
        target._metadata = state["_metadata"]
    elif isinstance(target, _NumpyDtype):
      if type(state) is not tuple or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
        raise CheckpointFormatError("malformed numpy dtype state")
      if any(s is not None for s in state[2:5]):
        raise CheckpointFormatError("structured numpy dtypes are not rebuilt")
      if state[1] in "<>":
        target.dtype = target.dtype.newbyteorder(state[1])
    elif isinstance(target, _NumpyArray):
      if type(state) is not tuple or len(state) != 5:
        raise CheckpointFormatError("malformed numpy array state")
      _, shape, dtype, fortran, raw = state
      target.array = _np_array(raw, _np_dtype_arg(dtype), shape, bool(fortran))
    else:
      raise CheckpointFormatError(
          f"BUILD on {_describe(target)} is not allowed (allow-listed objects cannot be modified "
          "by a file)")

  def text(self, data: bytes) -> str:
    return data.decode("utf-8", "surrogatepass")

  def line_int(self) -> int:
    return int(self.src.readline()[:-1])


def _length(m: _Machine, fmt: str, size: int) -> int:
  (n,) = struct.unpack(fmt, m.src.read(size))
  if n < 0:
    raise CheckpointFormatError(f"negative length {n} in the pickle")
  return n


@_op(pickle.PROTO)
def _proto(m):
  if m.src.byte() > 5:
    raise CheckpointFormatError("unsupported pickle protocol")


@_op(pickle.FRAME)
def _frame(m):
  m.src.read(8)


@_op(pickle.STOP)
def _stop(m):
  m.result = m.stack.pop()
  return _STOP


@_op(pickle.MARK)
def _mark(m):
  m.metastack.append(m.stack)
  m.stack = []


@_op(pickle.POP)
def _pop(m):
  if m.stack:
    m.stack.pop()
  else:
    m.pop_mark()


@_op(pickle.POP_MARK)
def _pop_mark(m):
  m.pop_mark()


@_op(pickle.DUP)
def _dup(m):
  m.stack.append(m.stack[-1])


@_op(pickle.NONE)
def _none(m):
  m.stack.append(None)


@_op(pickle.NEWTRUE)
def _newtrue(m):
  m.stack.append(True)


@_op(pickle.NEWFALSE)
def _newfalse(m):
  m.stack.append(False)


@_op(pickle.INT)
def _int_op(m):
  data = m.src.readline()
  if data == b"00\n":
    m.stack.append(False)
  elif data == b"01\n":
    m.stack.append(True)
  else:
    m.stack.append(int(data, 0))


@_op(pickle.BININT)
def _binint(m):
  m.stack.append(struct.unpack("<i", m.src.read(4))[0])


@_op(pickle.BININT1)
def _binint1(m):
  m.stack.append(m.src.byte())


@_op(pickle.BININT2)
def _binint2(m):
  m.stack.append(struct.unpack("<H", m.src.read(2))[0])


@_op(pickle.LONG)
def _long(m):
  data = m.src.readline()[:-1]
  if data.endswith(b"L"):
    data = data[:-1]
  m.stack.append(int(data, 0))


@_op(pickle.LONG1)
def _long1(m):
  n = m.src.byte()
  m.stack.append(int.from_bytes(m.src.read(n), "little", signed=True))


@_op(pickle.LONG4)
def _long4(m):
  n = _length(m, "<i", 4)
  m.stack.append(int.from_bytes(m.src.read(n), "little", signed=True))


@_op(pickle.FLOAT)
def _float(m):
  m.stack.append(float(m.src.readline()[:-1]))


@_op(pickle.BINFLOAT)
def _binfloat(m):
  m.stack.append(struct.unpack(">d", m.src.read(8))[0])


def _py2_string(m, data: bytes) -> None:
  m.stack.append(data.decode("utf-8"))


@_op(pickle.STRING)
def _string(m):
  data = m.src.readline()[:-1]
  if len(data) >= 2 and data[0] == data[-1] and data[:1] in (b'"', b"'"):
    data = data[1:-1]
  else:
    raise CheckpointFormatError("the STRING opcode argument must be quoted")
  _py2_string(m, codecs.escape_decode(data)[0])


@_op(pickle.BINSTRING)
def _binstring(m):
  _py2_string(m, m.src.read(_length(m, "<i", 4)))


@_op(pickle.SHORT_BINSTRING)
def _short_binstring(m):
  _py2_string(m, m.src.read(m.src.byte()))


@_op(pickle.UNICODE)
def _unicode(m):
  m.stack.append(m.src.readline()[:-1].decode("raw-unicode-escape"))


@_op(pickle.SHORT_BINUNICODE)
def _short_binunicode(m):
  m.stack.append(m.text(m.src.read(m.src.byte())))


@_op(pickle.BINUNICODE)
def _binunicode(m):
  m.stack.append(m.text(m.src.read(_length(m, "<I", 4))))


@_op(pickle.BINUNICODE8)
def _binunicode8(m):
  m.stack.append(m.text(m.src.read(_length(m, "<Q", 8))))


@_op(pickle.SHORT_BINBYTES)
def _short_binbytes(m):
  m.stack.append(m.src.read(m.src.byte()))


@_op(pickle.BINBYTES)
def _binbytes(m):
  m.stack.append(m.src.read(_length(m, "<I", 4)))


@_op(pickle.BINBYTES8)
def _binbytes8(m):
  m.stack.append(m.src.read(_length(m, "<Q", 8)))


@_op(pickle.BYTEARRAY8)
def _bytearray8(m):
  m.stack.append(bytearray(m.src.read(_length(m, "<Q", 8))))


@_op(pickle.NEXT_BUFFER)
def _next_buffer(m):
  raise CheckpointFormatError("out-of-band pickle buffers are not supported")


@_op(pickle.READONLY_BUFFER)
def _readonly_buffer(m):
  raise CheckpointFormatError("out-of-band pickle buffers are not supported")


@_op(pickle.EMPTY_TUPLE)
def _empty_tuple(m):
  m.stack.append(())


@_op(pickle.TUPLE)
def _tuple(m):
  items = m.pop_mark()
  m.units(len(items))
  m.stack.append(tuple(items))


@_op(pickle.TUPLE1)
def _tuple1(m):
  m.stack[-1] = (m.stack[-1],)


@_op(pickle.TUPLE2)
def _tuple2(m):
  m.stack[-2:] = [(m.stack[-2], m.stack[-1])]


@_op(pickle.TUPLE3)
def _tuple3(m):
  m.stack[-3:] = [(m.stack[-3], m.stack[-2], m.stack[-1])]


@_op(pickle.EMPTY_LIST)
def _empty_list(m):
  m.stack.append([])


@_op(pickle.LIST)
def _list(m):
  items = m.pop_mark()
  m.units(len(items))
  m.stack.append(items)


@_op(pickle.EMPTY_DICT)
def _empty_dict(m):
  m.units(1)
  m.stack.append({})


@_op(pickle.DICT)
def _dict(m):
  items = m.pop_mark()
  if len(items) % 2:
    raise CheckpointFormatError("DICT with an odd number of items")
  m.units(len(items))
  out = {}
  for i in range(0, len(items), 2):
    _check_key(m, items[i])
    out[items[i]] = items[i + 1]
  m.stack.append(out)


@_op(pickle.EMPTY_SET)
def _empty_set(m):
  m.units(4)
  m.stack.append(set())


@_op(pickle.FROZENSET)
def _frozenset(m):
  items = m.pop_mark()
  m.units(4 + len(items))
  for item in items:
    _check_key(m, item, "set element")
  m.stack.append(frozenset(items))


@_op(pickle.ADDITEMS)
def _additems(m):
  items = m.pop_mark()
  target = m.stack[-1]
  if type(target) is not set:
    raise CheckpointFormatError(f"ADDITEMS on {_describe(target)} is not allowed")
  m.units(len(items))
  for item in items:
    _check_key(m, item, "set element")
  target.update(items)


@_op(pickle.APPEND)
def _append(m):
  value = m.stack.pop()
  m.append(m.stack[-1], [value])


@_op(pickle.APPENDS)
def _appends(m):
  items = m.pop_mark()
  m.units(len(items))
  m.append(m.stack[-1], items)


@_op(pickle.SETITEM)
def _setitem(m):
  value = m.stack.pop()
  key = m.stack.pop()
  m.setitem(m.stack[-1], key, value)


@_op(pickle.SETITEMS)
def _setitems(m):
  items = m.pop_mark()
  if len(items) % 2:
    raise CheckpointFormatError("SETITEMS with an odd number of items")
  m.units(len(items))
  target = m.stack[-1]
  for i in range(0, len(items), 2):
    m.setitem(target, items[i], items[i + 1])


@_op(pickle.GLOBAL)
def _global(m):
  module = m.text(m.src.readline()[:-1])
  name = m.text(m.src.readline()[:-1])
  m.stack.append(m.find_class(module, name))


@_op(pickle.STACK_GLOBAL)
def _stack_global(m):
  name = m.stack.pop()
  module = m.stack.pop()
  m.stack.append(m.find_class(module, name))


def _ext(m):
  raise CheckpointFormatError("pickle extension codes (EXT1/2/4) are not supported")


for _code in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
  _op(_code)(_ext)


@_op(pickle.REDUCE)
def _reduce(m):
  args = m.stack.pop()
  m.stack[-1] = m.call(m.stack[-1], args)


@_op(pickle.BUILD)
def _build(m):
  state = m.stack.pop()
  m.build(m.stack[-1], state)


@_op(pickle.NEWOBJ)
def _newobj(m):
  args = m.stack.pop()
  cls = m.stack.pop()
  m.stack.append(m.new_object(cls, args, {}))


@_op(pickle.NEWOBJ_EX)
def _newobj_ex(m):
  kwargs = m.stack.pop()
  args = m.stack.pop()
  cls = m.stack.pop()
  m.stack.append(m.new_object(cls, args, kwargs))


@_op(pickle.INST)
def _inst(m):
  module = m.text(m.src.readline()[:-1])
  name = m.text(m.src.readline()[:-1])
  cls = m.find_class(module, name)
  m.stack.append(m.instantiate(cls, m.pop_mark()))


@_op(pickle.OBJ)
def _obj(m):
  args = m.pop_mark()
  cls = args.pop(0)
  m.stack.append(m.instantiate(cls, args))


@_op(pickle.PERSID)
def _persid(m):
  pid = m.src.readline()[:-1].decode("ascii")
  m.stack.append(_persistent(m, pid))


@_op(pickle.BINPERSID)
def _binpersid(m):
  m.stack[-1] = _persistent(m, m.stack[-1])


def _persistent(m, pid):
  if m.persistent_load is None:
    raise CheckpointFormatError(f"unexpected persistent id {_describe(pid)}")
  return m.persistent_load(pid)


@_op(pickle.GET)
def _get(m):
  m.stack.append(m.memo_get(m.line_int()))


@_op(pickle.BINGET)
def _binget(m):
  m.stack.append(m.memo_get(m.src.byte()))


@_op(pickle.LONG_BINGET)
def _long_binget(m):
  m.stack.append(m.memo_get(struct.unpack("<I", m.src.read(4))[0]))


@_op(pickle.PUT)
def _put(m):
  m.memo_put(m.line_int(), m.stack[-1])


@_op(pickle.BINPUT)
def _binput(m):
  m.memo_put(m.src.byte(), m.stack[-1])


@_op(pickle.LONG_BINPUT)
def _long_binput(m):
  m.memo_put(struct.unpack("<I", m.src.read(4))[0], m.stack[-1])


@_op(pickle.MEMOIZE)
def _memoize(m):
  m.memo_put(len(m.memo), m.stack[-1])


# ---------------------------------------------------------------------------
# After the pickle: depth and cycles, then the tensors.


def _children(obj: Any) -> Any:
  """The values nested in a container (keys and set elements are flat by construction)."""
  t = type(obj)
  if t is list or t is tuple:
    return obj
  if t is dict:
    return obj.values()
  if t is collections.OrderedDict:
    meta = obj.__dict__.get("_metadata")
    return list(obj.values()) + ([meta] if meta is not None else [])
  if isinstance(obj, InertObject):
    return (obj.new_args, obj.new_kwargs, obj.state, obj.items, obj.elements)
  return None


def _walk(root: Any, max_depth: int) -> tuple[list, list]:
  """Iterative DFS: refuses cycles and nesting deeper than max_depth.

  Returns the containers in post-order and the placeholders (tensors, storages,
  NumPy stand-ins) reachable from `root`, each once. Linear in the object graph.
  """
  height: dict[int, int] = {}
  active: set[int] = set()
  post, placeholders, seen = [], [], set()

  def enter(obj, depth):
    if isinstance(obj, _PLACEHOLDERS):
      if id(obj) not in seen:
        seen.add(id(obj))
        placeholders.append(obj)
      return None
    kids = _children(obj)
    if kids is None:
      return None
    if id(obj) in active:
      raise CheckpointFormatError("the pickle builds a container that contains itself")
    done = height.get(id(obj))
    if done is not None:
      if depth + done > max_depth:
        raise _limit_error("max_depth", max_depth, "nesting depth")
      return None
    if depth + 1 > max_depth:
      raise _limit_error("max_depth", max_depth, "nesting depth")
    active.add(id(obj))
    return [obj, iter(kids), 1]

  first = enter(root, 0)
  stack = [first] if first is not None else []
  while stack:
    frame = stack[-1]
    for child in frame[1]:
      new = enter(child, len(stack))
      if new is not None:
        stack.append(new)
        break
      done = height.get(id(child))  # containers only (live objects: ids are unique)
      if done is not None:
        frame[2] = max(frame[2], done + 1)
    else:
      obj, _, h = stack.pop()
      active.discard(id(obj))
      height[id(obj)] = h
      post.append(obj)
      if stack:
        stack[-1][2] = max(stack[-1][2], h + 1)
  return post, placeholders


def _replace(root: Any, post: list, repl: dict[int, Any]) -> Any:
  """Puts the materialised values in place of the placeholders (tuples are rebuilt)."""
  keep = []  # old objects stay alive so that their ids are not reused meanwhile
  for node in post:
    t = type(node)
    if t is list:
      for i, v in enumerate(node):
        r = repl.get(id(v), _STOP)
        if r is not _STOP:
          node[i] = r
    elif t is dict or t is collections.OrderedDict:
      changed = [(k, repl[id(v)]) for k, v in node.items() if id(v) in repl]
      for k, v in changed:
        node[k] = v
      meta = node.__dict__.get("_metadata") if t is collections.OrderedDict else None
      if meta is not None and id(meta) in repl:
        node._metadata = repl[id(meta)]
    elif t is tuple:
      if any(id(v) in repl for v in node):
        keep.append(node)
        repl[id(node)] = tuple(repl.get(id(v), v) for v in node)
    elif isinstance(node, InertObject):
      for name in ("new_args", "state"):
        value = getattr(node, name)
        if id(value) in repl:
          setattr(node, name, repl[id(value)])
  return repl.get(id(root), root)


def _byteswap(buf: np.ndarray, dtype: np.dtype) -> None:
  unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
  if unit > 1:
    usable = buf.size - buf.size % unit
    buf[:usable].view(f"u{unit}").byteswap(inplace=True)


def _materialize(t: _PendingTensor, raw: np.ndarray) -> np.ndarray:
  if math.prod(t.size) == 0:
    return np.zeros(t.size, t.dtype)
  usable = raw.size - raw.size % t.dtype.itemsize
  flat = raw[:usable].view(t.dtype)
  if t.whole:
    return flat.reshape(t.size)
  view = np.lib.stride_tricks.as_strided(
      flat[t.offset:], shape=t.size, strides=tuple(s * t.dtype.itemsize for s in t.stride),
      writeable=False)
  return np.array(view, copy=True, order="C")


def _arena(nbytes: int) -> np.ndarray:
  """One private anonymous mapping for the storages (writable; unmapped with its last view).

  Not `np.empty`: NumPy asks for transparent huge pages on large arrays, and on a
  busy host the kernel's compaction for them made loads several times slower.
  """
  if nbytes and hasattr(mmap, "MAP_PRIVATE"):
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE), np.uint8)
  return np.empty(nbytes, np.uint8)


def _finish(loader: _Load, root: Any, read_storages: Callable[[list, Callable], Any]) -> Any:
  """Checks the object graph, reads the storages it needs, materialises the placeholders.

  Storages that some tensor uses whole (the usual case) are read into one arena
  and those tensors are views of it (one allocation, as torch.load's tensors
  share their storages); storages used only through partial or strided views
  go to a scratch buffer and the views are copied out.
  """
  if loader.select is not None:
    root = loader.select(root)  # e.g. only the state dict: other storages are not read
  post, placeholders = _walk(root, loader.limits.max_depth)
  by_storage: dict[str, list] = collections.defaultdict(list)
  repl: dict[int, Any] = {}
  for p in placeholders:
    if isinstance(p, _PendingTensor):
      by_storage[p.storage.key].append(p)
    elif isinstance(p, _StorageRef):
      by_storage[p.key].append(p)
    elif isinstance(p, _NumpyDtype):
      repl[id(p)] = p.dtype
    elif p.array is None:
      raise CheckpointFormatError("a numpy array without data (no BUILD)")
    else:
      repl[id(p)] = p.array
  needed = [loader.storages[key] for key in by_storage]
  offsets, total = {}, 0
  for ref in needed:
    if any(isinstance(p, _StorageRef) or p.whole for p in by_storage[ref.key]):
      offsets[ref.key] = total
      total += -(-ref.nbytes // 64) * 64  # 64-byte aligned, as in torch's archives
  arena = _arena(total)

  def dest_for(ref: _StorageRef) -> np.ndarray:
    start = offsets.get(ref.key)
    if start is None:
      return np.empty(ref.nbytes, np.uint8)
    return arena[start:start + ref.nbytes]

  for ref, raw in read_storages(needed, dest_for):
    for p in by_storage.pop(ref.key, ()):
      if isinstance(p, _StorageRef):
        repl[id(p)] = raw[:raw.size - raw.size % p.dtype.itemsize].view(p.dtype)
      else:
        repl[id(p)] = _materialize(p, raw)
  if by_storage:
    raise CheckpointFormatError("internal error: storages left unread")
  return _replace(root, post, repl)


# ---------------------------------------------------------------------------
# The zip format (torch >= 1.6).

_ZIP_MAGIC = b"PK\x03\x04"


def _zip_names(info: zipfile.ZipInfo) -> bytes:
  return info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")


class _ZipArchive:
  """The central directory, checked so that it means what it means to torch (miniz)."""

  def __init__(self, f: Any, size: int, limits: _Limits):
    self.f, self.size = f, size
    try:
      endrec = zipfile._EndRecData(f)  # pylint: disable=protected-access
    except (OSError, ValueError, struct.error) as e:
      raise CheckpointFormatError(f"unreadable zip trailer ({type(e).__name__})") from None
    if not endrec:
      raise CheckpointFormatError("starts like a zip archive but has no end-of-central-directory "
                                  "record (truncated?)")
    entries = endrec[zipfile._ECD_ENTRIES_TOTAL]  # pylint: disable=protected-access
    size_cd = endrec[zipfile._ECD_SIZE]  # pylint: disable=protected-access
    offset_cd = endrec[zipfile._ECD_OFFSET]  # pylint: disable=protected-access
    concat = endrec[zipfile._ECD_LOCATION] - size_cd - offset_cd  # pylint: disable=protected-access
    if endrec[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:  # pylint: disable=protected-access
      concat -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator
    if concat != 0:
      raise CheckpointFormatError(
          f"zip central directory is {concat:,} bytes away from where its trailer says "
          "(torch and Python's zipfile would read different archives)")
    if entries > limits.max_zip_entries or size_cd > 1024 * limits.max_zip_entries:
      raise _limit_error("max_zip_entries", limits.max_zip_entries, f"{entries:,} zip entries")
    if not 0 <= offset_cd <= offset_cd + size_cd <= size:
      raise CheckpointFormatError("zip central directory out of the file")
    # Count the records before zipfile parses them (it reads all that fit in the directory).
    f.seek(offset_cd)
    directory, count, at = _read_exact(f, size_cd), 0, 0
    while at < size_cd:
      if directory[at:at + 4] != zipfile.stringCentralDir or at + 46 > size_cd:
        raise CheckpointFormatError(f"malformed zip central directory (record {count})")
      name_len, extra_len, comment_len = struct.unpack_from("<3H", directory, at + 28)
      at += 46 + name_len + extra_len + comment_len
      count += 1
      if count > limits.max_zip_entries:
        raise _limit_error("max_zip_entries", limits.max_zip_entries, "the zip entries")
    del directory
    if count != entries:
      raise CheckpointFormatError(
          f"the zip trailer counts {entries:,} entries, the central directory holds {count:,}")
    try:
      self.zf = zipfile.ZipFile(f)
    except Exception as e:  # noqa: BLE001 (zipfile raises many types on corrupt input)
      if isinstance(e, MemoryError):
        raise
      raise CheckpointFormatError(f"not a readable zip archive ({type(e).__name__})") from None
    infos = self.zf.infolist()
    if len(infos) != entries:
      raise CheckpointFormatError(
          f"the zip trailer counts {entries:,} entries, the central directory holds {len(infos):,}")
    if not infos:
      raise CheckpointFormatError("an empty zip archive: not a PyTorch checkpoint")
    first = infos[0].filename
    folder = first.split("/", 1)[0]
    if "/" not in first or not folder:
      raise CheckpointFormatError(
          f"zip entry {_describe(first)} is not in an archive folder: not a PyTorch checkpoint")
    self.prefix = folder + "/"
    self.records: dict[str, zipfile.ZipInfo] = {}
    raw_names = set()
    for info in infos:
      name = info.filename
      if info.orig_filename != name:
        raise CheckpointFormatError(f"zip entry name {_describe(info.orig_filename)} has a NUL")
      if not name.startswith(self.prefix):
        raise CheckpointFormatError(
            f"zip entries in two archive folders ({_describe(self.prefix)} and "
            f"{_describe(name)}); torch refuses such archives")
      raw = _zip_names(info)
      if name in self.records or raw in raw_names:
        raise CheckpointFormatError(
            f"duplicate zip entry {_describe(name)} (torch reads the first, other tools the last)")
      self.records[name] = info
      raw_names.add(raw)

  def get(self, name: str) -> zipfile.ZipInfo | None:
    return self.records.get(self.prefix + name)

  def read(self, info: zipfile.ZipInfo, dest: memoryview, what: str, verify_crc: bool = True
           ) -> None:
    """Reads one record into `dest` (its expected size): streams and stops past it.

    Deflated records are always CRC-checked; stored ones if `verify_crc` (torch
    does not check them).
    """
    f, n = self.f, len(dest)
    if info.flag_bits & 0x1:
      raise CheckpointFormatError(f"{what}: encrypted zip entries are not supported")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
      raise CheckpointFormatError(
          f"{what}: zip compression method {info.compress_type} (torch reads only stored or "
          "deflated entries)")
    if info.file_size != n:
      raise CheckpointFormatError(
          f"{what}: record size ({info.file_size:,} bytes) does not match the expected size "
          f"({n:,} bytes)")
    start = info.header_offset
    if not 0 <= start <= self.size - 30:
      raise CheckpointFormatError(f"{what}: local header offset out of the file")
    f.seek(start)
    header = _read_exact(f, 30)
    fields = struct.unpack(zipfile.structFileHeader, header)
    if fields[0] != zipfile.stringFileHeader:
      raise CheckpointFormatError(f"{what}: bad zip local header")
    name_len = fields[zipfile._FH_FILENAME_LENGTH]  # pylint: disable=protected-access
    extra_len = fields[zipfile._FH_EXTRA_FIELD_LENGTH]  # pylint: disable=protected-access
    if _read_exact(f, name_len) != _zip_names(info):
      raise CheckpointFormatError(f"{what}: zip local header names another file")
    data_start = start + 30 + name_len + extra_len
    if data_start + info.compress_size > self.size:
      raise CheckpointFormatError(f"{what}: zip entry extends past the end of the file")
    f.seek(data_start)
    crc = 0
    if info.compress_type == zipfile.ZIP_STORED:
      if info.compress_size != n:
        raise CheckpointFormatError(f"{what}: stored entry with a compressed size")
      got = 0
      while got < n:
        k = min(n - got, 64 * _CHUNK)
        _readinto_exact(f, dest[got:got + k])
        if verify_crc:
          crc = zlib.crc32(dest[got:got + k], crc)
        got += k
    else:
      crc, verify_crc = self._inflate(info, dest, what), True
    if verify_crc and crc != info.CRC:
      raise CheckpointFormatError(f"{what}: CRC mismatch (corrupt file)")

  def _inflate(self, info: zipfile.ZipInfo, dest: memoryview, what: str) -> int:
    f, n = self.f, len(dest)
    inflater = zlib.decompressobj(-15)
    left, got, crc, pending = info.compress_size, 0, 0, b""
    while True:
      if not pending and left > 0:
        pending = _read_exact(f, min(left, _CHUNK))
        left -= len(pending)
      try:
        out = inflater.decompress(pending, min(n - got, _CHUNK) + 1)
      except zlib.error:
        raise CheckpointFormatError(f"{what}: corrupt deflate stream") from None
      pending = inflater.unconsumed_tail
      if len(out) > n - got:
        raise CheckpointFormatError(
            f"{what}: the record inflates beyond the {n:,} bytes it should hold (zip bomb?); "
            "stopped there")
      dest[got:got + len(out)] = out
      crc = zlib.crc32(out, crc)
      got += len(out)
      if inflater.eof:
        break
      if not out and not pending and left == 0:
        raise CheckpointFormatError(f"{what}: truncated deflate stream")
    if got != n:
      raise CheckpointFormatError(f"{what}: inflates to {got:,} bytes, {n:,} expected")
    return crc


def _read_zip(f: Any, size: int, loader: _Load) -> Any:
  limits = loader.limits
  archive = _ZipArchive(f, size, limits)
  pkl = archive.get("data.pkl")
  if pkl is None:
    raise CheckpointFormatError(
        f"a zip archive without {_describe(archive.prefix + 'data.pkl')}: not a PyTorch checkpoint")
  if pkl.file_size > limits.max_pickle_bytes:
    raise _limit_error("max_pickle_bytes", limits.max_pickle_bytes,
                       f"data.pkl ({pkl.file_size:,} bytes)")
  data = bytearray(pkl.file_size)
  archive.read(pkl, memoryview(data), "data.pkl")
  big = False
  order = archive.get("byteorder")
  if order is not None:
    if order.file_size > 16:
      raise CheckpointFormatError("unknown byteorder record")
    value = bytearray(order.file_size)
    archive.read(order, memoryview(value), "byteorder")
    if value not in (b"little", b"big"):
      raise CheckpointFormatError(f"unknown byteorder {_describe(bytes(value))} (torch accepts "
                                  "exactly 'little' or 'big')")
    big = value == b"big"

  def storage_record(key, dtype, numel):
    info = archive.get(f"data/{key}")
    if info is None:
      raise CheckpointFormatError(f"storage {_describe(key)} is missing from the archive")
    if info.file_size != numel * dtype.itemsize:
      raise CheckpointFormatError(
          f"storage {_describe(key)}: record size ({info.file_size:,} bytes) does not match the "
          f"expected size ({numel * dtype.itemsize:,} bytes)")
    return info

  loader.storage_record = storage_record

  def persistent_load(pid):
    if type(pid) is not tuple or len(pid) != 5 or pid[0] not in ("storage", b"storage"):
      raise CheckpointFormatError(f"unsupported persistent id {_describe(pid)}")
    _, storage_type, key, location, numel = pid
    if type(location) not in (str, bytes):
      raise CheckpointFormatError(f"malformed storage location {_describe(location)}")
    return loader.storage(key, storage_type, numel)

  root = _Machine(loader, _Source(bytes(data)), persistent_load).run()
  del data

  def read_storages(refs, dest_for):
    for ref in sorted(refs, key=lambda r: r.record.header_offset):
      raw = dest_for(ref)
      archive.read(ref.record, memoryview(raw), f"storage {_describe(ref.key)}",
                   loader.verify_crc)
      if big:
        _byteswap(raw, ref.dtype)
      yield ref, raw

  return _finish(loader, root, read_storages)


# ---------------------------------------------------------------------------
# The legacy format (torch < 1.6, or `_use_new_zipfile_serialization=False`).


def _has_zip_trailer(f: Any, size: int) -> bool:
  """Whether a zip reader would find an archive at the end of the file.

  Looks for an end-of-central-directory record in the last 64 KiB whose comment
  length reaches the end of the file, or which points at a central directory
  (where it says, as miniz reads it, or just before itself, as Python's zipfile
  does), or which defers to zip64.
  """
  start = max(0, size - (1 << 16) - 22)
  f.seek(start)
  tail = _read_exact(f, size - start)
  i = len(tail)
  while True:
    i = tail.rfind(zipfile.stringEndArchive, 0, i)
    if i < 0:
      return False
    if i + 22 > len(tail):
      continue
    fields = struct.unpack(zipfile.structEndArchive, tail[i:i + 22])
    comment = fields[zipfile._ECD_COMMENT_SIZE]  # pylint: disable=protected-access
    cd_size = fields[zipfile._ECD_SIZE]  # pylint: disable=protected-access
    cd_offset = fields[zipfile._ECD_OFFSET]  # pylint: disable=protected-access
    if i + 22 + comment == len(tail) or 0xFFFFFFFF in (cd_size, cd_offset):
      return True
    for where in (cd_offset, start + i - cd_size):
      if 0 <= where <= size - 4:
        f.seek(where)
        if f.read(4) == zipfile.stringCentralDir:
          return True


def _is_tar(head: bytes) -> bool:
  if len(head) < 512:
    return False
  try:
    tarfile.TarInfo.frombuf(head[:512], tarfile.ENCODING, "surrogateescape")
  except Exception:  # noqa: BLE001 (not a tar header)
    return False
  return True


def _read_legacy(f: Any, size: int, loader: _Load) -> Any:
  limits = loader.limits
  f.seek(0)
  head = f.read(512)
  if _is_tar(head):
    raise CheckpointFormatError("a tar archive (the pre-0.4 torch format, which torch reads "
                                "differently): not supported")
  f.seek(0)
  src = _Source(f=f, start=0, end=min(size, limits.max_pickle_bytes),
                limited=size > limits.max_pickle_bytes)
  try:
    magic = _Machine(loader, src, None).run()
  except UnsafeCheckpointError:
    raise
  except CheckpointLimitError:
    raise
  except CheckpointFormatError as e:
    raise CheckpointFormatError(
        f"not a PyTorch checkpoint (neither a zip archive nor the legacy format: {e.reason})"
    ) from None
  if type(magic) is not int or magic != _LEGACY_MAGIC:
    raise CheckpointFormatError("not a PyTorch checkpoint (no zip archive, no legacy magic "
                                "number)")
  protocol = _Machine(loader, src, None).run()
  if type(protocol) is not int or protocol != _LEGACY_PROTOCOL:
    raise CheckpointFormatError(f"unsupported legacy protocol version {_describe(protocol)}")
  _Machine(loader, src, None).run()  # sys_info: informational (storages are little-endian)
  if _has_zip_trailer(f, size):
    raise CheckpointFormatError(
        "a legacy-format checkpoint that also ends like a zip archive (torch reads the legacy "
        "pickle, zip tools the archive): refused")
  f.seek(src.base + len(src.buf))  # where the source's next read continues

  def persistent_load(pid):
    if type(pid) is not tuple or not pid or pid[0] not in ("storage", b"storage"):
      if type(pid) is tuple and pid and pid[0] in ("module", b"module"):
        raise CheckpointFormatError("the file pickles a whole nn.Module (with its source code); "
                                    "only state dicts and plain data are read")
      raise CheckpointFormatError(f"unsupported persistent id {_describe(pid)}")
    if len(pid) != 6:
      raise CheckpointFormatError(f"malformed storage id {_describe(pid)}")
    _, storage_type, key, location, numel, view = pid
    if type(location) not in (str, bytes):
      raise CheckpointFormatError(f"malformed storage location {_describe(location)}")
    if view is not None:
      raise CheckpointFormatError("legacy storage views are not supported")
    ref = loader.storage(key, storage_type, numel)
    if ref.nbytes > size:
      raise CheckpointFormatError(f"storage {_describe(key)} is larger than the file")
    return ref

  root = _Machine(loader, src, persistent_load).run()
  keys = _Machine(loader, src, None).run()
  if type(keys) is not list or any(type(k) is not str for k in keys):
    raise CheckpointFormatError("malformed list of storage keys")
  if len(set(keys)) != len(keys):
    raise CheckpointFormatError("a storage key is listed twice")
  if set(keys) != set(loader.storages):
    unlisted = sorted(set(loader.storages) - set(keys))[:3]
    unknown = sorted(set(keys) - set(loader.storages))[:3]
    raise CheckpointFormatError(
        f"storages referenced but not stored: {[_clip(k, 40) for k in unlisted]}; stored but "
        f"not referenced: {[_clip(k, 40) for k in unknown]}")
  total = sum(8 + loader.storages[k].nbytes for k in keys)
  if src.tell() + total != size:
    raise CheckpointFormatError(
        f"the storages take {total:,} bytes after byte {src.tell():,}, the file has "
        f"{size - src.tell():,} (truncated, or trailing data)")

  def read_storages(refs, dest_for):
    wanted = {ref.key for ref in refs}
    for key in keys:
      ref = loader.storages[key]
      header = bytearray(8)
      src.readinto(memoryview(header))
      (count,) = struct.unpack("<q", header)
      if count != ref.numel:
        raise CheckpointFormatError(
            f"storage {_describe(key)}: {count:,} elements on disk, {ref.numel:,} expected")
      if key in wanted:
        raw = dest_for(ref)
        src.readinto(memoryview(raw))
        yield ref, raw
      else:
        src.skip(ref.nbytes)

  return _finish(loader, root, read_storages)


# ---------------------------------------------------------------------------
# Public API.


def _open(path: Any) -> Any:
  from etils import epath  # pylint: disable=import-outside-toplevel
  return epath.Path(path).open("rb")


def _limits(max_pickle_bytes, max_depth, max_memo, max_objects, max_tensor_bytes,
            max_zip_entries) -> _Limits:
  return _Limits(
      MAX_PICKLE_BYTES if max_pickle_bytes is None else int(max_pickle_bytes),
      MAX_DEPTH if max_depth is None else int(max_depth),
      MAX_MEMO if max_memo is None else int(max_memo),
      MAX_OBJECTS if max_objects is None else int(max_objects),
      None if max_tensor_bytes is None else int(max_tensor_bytes),
      MAX_ZIP_ENTRIES if max_zip_entries is None else int(max_zip_entries))


def read_torch_file(path: str | os.PathLike, *, max_pickle_bytes: int | None = None,
                    max_depth: int | None = None, max_memo: int | None = None,
                    max_objects: int | None = None, max_tensor_bytes: int | None = None,
                    max_zip_entries: int | None = None, verify_crc: bool = False) -> Any:
  """Unpickles a whole `.pth` file safely: tensors -> NumPy, unknown objects -> `InertObject`.

  Args:
    path: a local path or a `gs://` URL (opened with `etils.epath`).
    max_*: override the module's limits (MAX_PICKLE_BYTES, ...); `max_tensor_bytes`
      defaults to min(MAX_TENSOR_BYTES, max(MIN_TENSOR_BYTES,
      TENSOR_BYTES_PER_FILE_BYTE * file size)).
    verify_crc: also check the CRC-32 of stored (uncompressed) tensor records, which
      torch does not (about +50% load time); `data.pkl` and deflated records are
      always checked.

  Returns:
    The unpickled object: tensors as NumPy arrays (tensors that use a whole storage
    share one buffer; shared references stay shared), placeholders for unknown classes.

  Raises:
    UnsafeCheckpointError: the pickle asks to call a function not on the allow-list.
    CheckpointLimitError: the file exceeds a limit (the message names the keyword).
    CheckpointFormatError: not a PyTorch checkpoint, malformed, or unsupported.
    OSError: the file cannot be opened or read.
  """
  limits = _limits(max_pickle_bytes, max_depth, max_memo, max_objects, max_tensor_bytes,
                   max_zip_entries)
  return _read(path, limits, verify_crc, None)


def _display(path: Any) -> str:
  return str(os.fspath(path) if isinstance(path, (str, os.PathLike)) else path)


def _read(path: Any, limits: _Limits, verify_crc: bool, select: Callable | None) -> Any:
  display = _display(path)
  with _open(path) as f:
    try:
      size = f.seek(0, 2)
      size = f.tell() if size is None else size
      f.seek(0)
      loader = _Load(limits, size)
      loader.verify_crc, loader.select = bool(verify_crc), select
      magic = f.read(4)
      if magic == _ZIP_MAGIC:
        return _read_zip(f, size, loader)
      return _read_legacy(f, size, loader)
    except CheckpointLoadError as e:
      raise e.with_path(display) from None
    except OSError:
      raise
    except MemoryError:
      raise CheckpointLimitError("ran out of memory while reading the file", display) from None
    except RecursionError:
      raise CheckpointLimitError("nesting too deep to read", display) from None
    except Exception as e:  # noqa: BLE001 (every other failure is reported as a format error)
      detail = str(e) if all(type(a) is str and len(a) < 200 for a in e.args) else ""
      raise CheckpointFormatError(
          f"unexpected {type(e).__name__} while reading the file: {_clip(detail, 200)}",
          display) from e


_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile
_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "module")


def _is_array(value: Any) -> bool:
  return isinstance(value, (np.ndarray, _PendingTensor, _NumpyArray))


def _find_state_dict(obj: Any) -> Mapping:
  """The mapping that holds the model's tensors (before or after they are materialised)."""
  sd = obj
  if isinstance(obj, Mapping):
    for key in _WRAPPER_KEYS:
      if isinstance(obj.get(key), Mapping):
        sd = obj[key]
        break
  if not isinstance(sd, Mapping) or not any(_is_array(v) for v in sd.values()):
    top = ([_describe(k) for k in itertools.islice(obj, 10)] if isinstance(obj, Mapping)
           else _describe(obj))
    raise CheckpointFormatError(f"no state dict found (top level: {_clip(str(top), 400)}); "
                                "expected a dict of tensors or a dict with a 'model' entry")
  return sd


def _clean_state_dict(sd: Mapping, source: str) -> dict[str, np.ndarray]:
  out: dict[str, np.ndarray] = {}
  origin: dict[str, str] = {}
  skipped = []
  for key, value in sd.items():
    if type(key) is not str:
      raise CheckpointFormatError(f"state-dict key {_describe(key)} is not a string", source)
    if not isinstance(value, np.ndarray):
      skipped.append(key)
      continue
    name = key
    while name.startswith(_PREFIXES):
      name = name[len(next(p for p in _PREFIXES if name.startswith(p))):]
    if name in out:
      raise CheckpointFormatError(
          f"state-dict keys {_describe(origin[name])} and {_describe(key)} both name "
          f"{_describe(name)} once the prefixes {list(_PREFIXES)} are stripped", source)
    out[name] = value
    origin[name] = key
  if skipped:
    logging.warning("%s: skipped non-tensor state-dict entries %s", _clip(source, 300),
                    [_clip(k, 60) for k in skipped[:10]])
  return out


def extract_state_dict(obj: Any, *, source: str = "checkpoint") -> dict[str, np.ndarray]:
  """Finds the model's state dict in an unpickled checkpoint; strips `module.` / `_orig_mod.`.

  Accepts the released wrapper (`{'model': state_dict, 'optimizer': ..., 'config': ...}`),
  `{'state_dict': ...}` and bare state dicts.

  Raises:
    CheckpointFormatError: no state dict, a key that is not a string, or two keys that
      become the same after the prefixes are stripped.
  """
  try:
    sd = _find_state_dict(obj)
  except CheckpointLoadError as e:
    raise e.with_path(source) from None
  return _clean_state_dict(sd, source)


def load_torch_checkpoint(path: str | os.PathLike, *, verify_crc: bool = False,
                          **limits: int | None) -> dict[str, np.ndarray]:
  """Reads the model state dict of a PyTorch `.pth` file as NumPy arrays.

  No torch import, and nothing from the file is executed (see the module doc). Only
  the state dict's storages are read (not, e.g., the optimizer's).

  Args:
    path: a `.pth` written by `torch.save` (zip format, or the legacy format); a local
      path or a `gs://` URL.
    verify_crc: as for `read_torch_file`.
    **limits: `max_pickle_bytes`, `max_depth`, ... as for `read_torch_file`.

  Returns:
    `{official key: array}` in file order, `module.` / `_orig_mod.` prefixes
    stripped, dtypes as stored (bfloat16 as `ml_dtypes.bfloat16`).

  Raises:
    CheckpointLoadError (UnsafeCheckpointError, CheckpointLimitError,
    CheckpointFormatError): see `read_torch_file`; also no state dict, non-string
    keys, or keys that collide once prefixes are stripped.
    OSError: the file cannot be opened or read.
  """
  limits_ = _limits(**{name: limits.pop(name, None) for name in _Limits._fields})
  if limits:
    raise TypeError(f"load_torch_checkpoint: unexpected arguments {sorted(limits)}")
  return _clean_state_dict(_read(path, limits_, verify_crc, _find_state_dict), _display(path))
