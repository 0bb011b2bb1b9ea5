"""Reads PyTorch `.pth` checkpoints with NumPy only: no torch, no code from the file.

A `.pth` file is a pickle, and unpickling normally imports and calls whatever
the file names. Here a restricted `pickle.Unpickler`:

* rebuilds tensors with our own re-implementations of the few functions torch
  pickles (`torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`, ...) and
  reads their bytes straight from the archive (`<name>/data/<key>` in the zip
  format; the storages after the pickles in the legacy format);
* rebuilds plain containers (dict, OrderedDict, list, set, ...) and a few data
  types (NumPy scalars and arrays, `torch.Size`, dtypes);
* turns every other global (a yacs `CfgNode`, an `argparse.Namespace`, any
  class of a library that is not installed) into an inert placeholder class:
  the pickle may *create* an instance of it and fill its state
  (NEWOBJ / BUILD / SETITEMS), which stores data and runs nothing;
* refuses, with `UnsafeCheckpointError` naming it, any attempt to *call* a
  global that is not allow-listed (`os.system`, `builtins.eval`,
  `subprocess.Popen`, ...): calling an inert placeholder raises.

Typical use: `state_dict = load_torch_checkpoint("video-focalnet_tiny.pth")`.
"""
from __future__ import annotations

import builtins
import collections
import io
import logging
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any, Callable

import ml_dtypes
import numpy as np

__all__ = [
    "UnsafeCheckpointError", "InertObject", "load_torch_checkpoint", "read_torch_file",
    "extract_state_dict",
]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_MAX_TENSOR_BYTES = 64 * 2**30  # a stride-0 view of a small storage must not become a huge copy


class UnsafeCheckpointError(pickle.UnpicklingError):
  """The pickle asked to call a function that is not on the allow-list."""


# ---------------------------------------------------------------------------
# Inert placeholders for globals we do not import.


class _InertMeta(type):
  """Metaclass of placeholders: creating instances via NEWOBJ is fine, calling is refused."""

  def __call__(cls, *args, **kwargs):
    raise UnsafeCheckpointError(
        f"the checkpoint's pickle asks to call {cls._pickle_global}{_short_args(args)}, which is not "
        "on the allow-list of this loader (only tensors, plain containers and NumPy data are "
        "rebuilt). Nothing was executed. If you trust this file, load it with torch.load instead "
        "and save a plain state dict (torch.save(model.state_dict(), path)).")


def _short_args(args: tuple) -> str:
  text = repr(args)
  return text if len(text) < 80 else text[:77] + "...)"


class InertObject(metaclass=_InertMeta):
  """Stand-in for an instance of a class the loader does not import (data only).

  Attributes:
    new_args: the arguments NEWOBJ passed to `cls.__new__`.
    state: what BUILD passed (usually the object's `__dict__`).
    items: entries added by SETITEMS (dict subclasses such as yacs `CfgNode`).
    elements: entries added by APPENDS (list subclasses).
  """
  _pickle_global = "?"

  def __new__(cls, *args, **kwargs):
    obj = object.__new__(cls)
    obj.new_args, obj.state, obj.items, obj.elements = args, None, {}, []
    return obj

  def __setstate__(self, state: Any) -> None:
    self.state = state

  def __setitem__(self, key: Any, value: Any) -> None:
    self.items[key] = value

  def append(self, value: Any) -> None:
    self.elements.append(value)

  def extend(self, values: Any) -> None:
    self.elements.extend(values)

  def __repr__(self) -> str:
    return f"<inert {self._pickle_global}>"


_INERT_CLASSES: dict[tuple[str, str], type] = {}


def _inert_class(module: str, name: str) -> type:
  key = (module, name)
  if key not in _INERT_CLASSES:
    _INERT_CLASSES[key] = _InertMeta(name.replace(".", "_"), (InertObject,),
                                     {"_pickle_global": f"{module}.{name}", "__module__": __name__})
  return _INERT_CLASSES[key]


# ---------------------------------------------------------------------------
# Storages and tensors.

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


class _StorageType:
  """What `torch.FloatStorage` & co. unpickle to: only a dtype."""

  def __init__(self, name: str, dtype: Any):
    self.name, self.dtype = name, np.dtype(dtype)

  def __repr__(self) -> str:
    return f"torch.{self.name}"


class _TorchDtype:
  """What `torch.float32` & co. unpickle to."""

  def __init__(self, name: str, dtype: Any):
    self.name, self.dtype = name, np.dtype(dtype)

  def __repr__(self) -> str:
    return f"torch.{self.name}"


class _Storage:
  """A flat, read-only array of one storage's elements."""

  def __init__(self, data: np.ndarray):
    self.data = data


def _as_int_tuple(value: Any, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) for v in value):
    raise pickle.UnpicklingError(f"malformed tensor {what}: {value!r}")
  return tuple(value)


def _strided_copy(flat: np.ndarray, offset: int, size: tuple, stride: tuple) -> np.ndarray:
  """Copies the view `flat[offset:]` with `size`/`stride` (in elements), bounds checked."""
  if not isinstance(offset, int) or offset < 0 or any(s < 0 for s in size + stride):
    raise pickle.UnpicklingError(f"malformed tensor view: offset {offset}, size {size}, stride {stride}")
  if len(size) != len(stride):
    raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in length")
  if 0 in size:
    return np.zeros(size, flat.dtype)
  if math.prod(size) * flat.itemsize > _MAX_TENSOR_BYTES:
    raise pickle.UnpicklingError(f"tensor of shape {size} would take more than 64 GiB")
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.size:
    raise pickle.UnpicklingError(f"tensor view reads element {last} of a storage of {flat.size}")
  view = np.lib.stride_tricks.as_strided(
      flat[offset:], shape=size, strides=tuple(s * flat.itemsize for s in stride), writeable=False)
  return np.array(view, copy=True, order="C")


def _storage_array(storage: Any, dtype: np.dtype | None = None) -> np.ndarray:
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError(f"expected a tensor storage, got {type(storage).__name__}")
  flat = storage.data
  if dtype is not None and flat.dtype != dtype:
    usable = flat.nbytes - flat.nbytes % dtype.itemsize
    flat = flat.view(np.uint8)[:usable].view(dtype)
  return flat


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _strided_copy(_storage_array(storage), storage_offset, _as_int_tuple(size, "size"),
                       _as_int_tuple(stride, "stride"))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
  del requires_grad, backward_hooks, metadata
  if not isinstance(dtype, _TorchDtype):
    raise pickle.UnpicklingError(f"malformed tensor dtype {dtype!r}")
  return _strided_copy(_storage_array(storage, dtype.dtype), storage_offset,
                       _as_int_tuple(size, "size"), _as_int_tuple(stride, "stride"))


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  del requires_grad, backward_hooks, state
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  """Tensor subclasses: `func` was itself resolved through the allow-list."""
  del new_type, state
  return func(*args)


# ---------------------------------------------------------------------------
# NumPy data inside checkpoints (e.g. a best-accuracy scalar).


class _NumpyDtype:
  """`numpy.dtype(...)` rebuilt as data; BUILD sets its byte order."""

  def __init__(self, spec: Any, align: Any = False, copy: Any = True):
    del align, copy
    if not isinstance(spec, str):
      raise pickle.UnpicklingError(f"unsupported numpy dtype spec {spec!r}")
    self.dtype = np.dtype(spec)
    if self.dtype.hasobject:
      raise pickle.UnpicklingError("numpy object arrays are not rebuilt")

  def __setstate__(self, state: Any) -> None:
    if isinstance(state, tuple) and len(state) > 1 and state[1] in "<>":
      self.dtype = self.dtype.newbyteorder(state[1])


class _NumpyArray:
  """`numpy.core.multiarray._reconstruct(...)` + BUILD, rebuilt from raw bytes."""

  def __init__(self, *args: Any):
    del args
    self.array: np.ndarray | None = None

  def __setstate__(self, state: Any) -> None:
    _, shape, dtype, fortran, raw = state
    if not isinstance(dtype, _NumpyDtype) or not isinstance(raw, (bytes, bytearray)):
      raise pickle.UnpicklingError("only numeric numpy arrays are rebuilt")
    array = np.frombuffer(raw, dtype.dtype).reshape(_as_int_tuple(tuple(shape), "shape"),
                                                    order="F" if fortran else "C")
    self.array = array.astype(dtype.dtype.newbyteorder("="))


def _numpy_scalar(dtype, raw=None):
  if not isinstance(dtype, _NumpyDtype) or not isinstance(raw, (bytes, bytearray)):
    raise pickle.UnpicklingError("only numeric numpy scalars are rebuilt")
  return np.frombuffer(raw, dtype.dtype)[0].astype(dtype.dtype.newbyteorder("="))


def _codecs_encode(text, encoding="utf-8", errors="strict"):
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
    raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not rebuilt")
  return text.encode(encoding, errors)


def _copyreg_reconstructor(cls, base, state):
  """Protocol 0/1 object reconstruction, for placeholder classes only."""
  if not (isinstance(cls, type) and issubclass(cls, InertObject)):
    raise UnsafeCheckpointError(f"copyreg._reconstructor of {cls!r} is not allowed")
  obj = cls.__new__(cls)
  obj.new_args = (base, state)
  return obj


def _copyreg_newobj(cls, *args):
  if not (isinstance(cls, type) and issubclass(cls, InertObject)):
    raise UnsafeCheckpointError(f"copyreg.__newobj__ of {cls!r} is not allowed")
  return cls.__new__(cls, *args)


_SAFE_BUILTINS = ("set", "frozenset", "slice", "complex", "range", "list", "dict", "tuple")


def _bytearray(data=b"", *args):
  """`bytearray(b'...')` as protocol 2 pickles it; never `bytearray(huge_int)`."""
  if isinstance(data, int):
    raise pickle.UnpicklingError("bytearray(int) is not rebuilt")
  return bytearray(data, *args)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _codecs_encode,
    ("copyreg", "_reconstructor"): _copyreg_reconstructor,
    ("copyreg", "__newobj__"): _copyreg_newobj,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): tuple,
    ("torch", "device"): lambda *args: ":".join(str(a) for a in args),
    ("numpy", "dtype"): _NumpyDtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _NumpyArray,
    ("numpy._core.multiarray", "_reconstruct"): _NumpyArray,
}
_ALLOWED.update({("builtins", n): getattr(builtins, n) for n in _SAFE_BUILTINS})
_ALLOWED[("builtins", "bytearray")] = _bytearray
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}  # protocol-2 pickles use these
_ALLOWED.update({("torch", n): _StorageType(n, d) for n, d in _STORAGE_DTYPES.items()})
_ALLOWED.update({("torch", n): _TorchDtype(n, d) for n, d in _TORCH_DTYPES.items()})


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves globals through the allow-list; storages through `load_storage`."""

  def __init__(self, file: io.IOBase, load_storage: Callable[[tuple], _Storage] | None):
    super().__init__(file)
    self._load_storage = load_storage

  def find_class(self, module: str, name: str) -> Any:
    module = _PY2_MODULES.get(module, module)
    allowed = _ALLOWED.get((module, name))
    if allowed is not None:
      return allowed
    return _inert_class(module, name)

  def persistent_load(self, pid: Any) -> Any:
    if (self._load_storage is None or not isinstance(pid, tuple) or not pid
        or pid[0] != "storage"):
      raise pickle.UnpicklingError(f"unsupported persistent id {str(pid)[:80]}")
    return self._load_storage(pid)


def _storage_dtype(storage_type: Any) -> np.dtype:
  if not isinstance(storage_type, _StorageType):
    raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
  return storage_type.dtype


def _read_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if not pkl:
      raise ValueError(f"{path}: a zip file without `<name>/data.pkl`: not a PyTorch checkpoint")
    prefix = pkl[0][: -len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = zf.read(prefix + "byteorder").decode().strip()
    cache: dict[str, _Storage] = {}

    def load_storage(pid: tuple) -> _Storage:
      if len(pid) != 5:
        raise pickle.UnpicklingError(f"malformed storage id {pid!r}")
      _, storage_type, key, _, numel = pid
      dtype = _storage_dtype(storage_type)
      key = str(key)
      if key not in cache:
        member = f"{prefix}data/{key}"
        if member not in names:
          raise pickle.UnpicklingError(f"storage {key!r} missing from the archive")
        raw = zf.read(member)
        dt = dtype.newbyteorder(">" if byteorder == "big" else "<")
        count = len(raw) // dt.itemsize
        if not isinstance(numel, int) or count < numel:
          raise pickle.UnpicklingError(f"storage {key!r} holds {count} elements, {numel} expected")
        flat = np.frombuffer(raw, dt, count=numel).astype(dtype.newbyteorder("="), copy=False)
        cache[key] = _Storage(flat)
      return cache[key]

    with zf.open(pkl[0]) as f:
      return _RestrictedUnpickler(io.BytesIO(f.read()), load_storage).load()


def _read_legacy(path: str) -> Any:
  """The pre-1.6 format: magic, protocol, sys_info, object pickle, storage keys, raw storages."""
  with open(path, "rb") as f:
    header = _RestrictedUnpickler(f, None)
    try:
      magic = header.load()
    except Exception as e:  # noqa: BLE001 (anything unreadable is reported the same way)
      raise ValueError(f"{path}: not a PyTorch checkpoint ({e})") from e
    if magic != _LEGACY_MAGIC:
      raise ValueError(f"{path}: not a PyTorch checkpoint (no zip archive, no legacy magic number)")
    header.load()  # protocol version
    sys_info = header.load()
    little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
    requested: dict[str, tuple[np.dtype, int]] = {}
    storages: dict[str, _Storage] = {}

    class _Lazy(_Storage):

      def __init__(self, key: str):  # pylint: disable=super-init-not-called
        self.key = key

      @property
      def data(self) -> np.ndarray:  # filled in after the storages are read
        return storages[self.key].data

    def load_storage(pid: tuple) -> _Storage:
      if len(pid) != 6:
        raise pickle.UnpicklingError(f"malformed storage id {pid!r}")
      _, storage_type, key, _, numel, view = pid
      if view is not None:
        raise pickle.UnpicklingError("legacy storage views are not supported")
      requested[str(key)] = (_storage_dtype(storage_type), numel)
      return _Lazy(str(key))

    # Tensors are rebuilt only after the storages that follow this pickle are read.
    body = _DeferringUnpickler(f, load_storage)
    obj = body.load()
    keys = _RestrictedUnpickler(f, None).load()
    for key in keys:
      if str(key) not in requested:
        raise pickle.UnpicklingError(f"storage {key!r} on disk but not referenced by the pickle")
      dtype, numel = requested[str(key)]
      (count,) = struct.unpack("<q" if little else ">q", f.read(8))
      if count != numel:
        raise pickle.UnpicklingError(f"storage {key!r}: {count} elements on disk, {numel} expected")
      raw = f.read(count * dtype.itemsize)
      dt = dtype.newbyteorder("<" if little else ">")
      storages[str(key)] = _Storage(np.frombuffer(raw, dt, count=count).astype(
          dtype.newbyteorder("="), copy=False))
    return _resolve_deferred(obj)


class _Deferred:
  """A tensor rebuild postponed until the legacy format's storages are read."""

  def __init__(self, fn: Callable, args: tuple):
    self.fn, self.args = fn, args

  def resolve(self) -> Any:
    return self.fn(*(_resolve_deferred(a) for a in self.args))


_TENSOR_FUNCTIONS = {_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter,
                     _rebuild_parameter_with_state, _rebuild_from_type_v2}


class _DeferringUnpickler(_RestrictedUnpickler):
  """Legacy format: tensor rebuilds wait until the storages (after the pickle) are read."""

  def find_class(self, module: str, name: str) -> Any:
    obj = super().find_class(module, name)
    if obj in _TENSOR_FUNCTIONS:
      return lambda *args: _Deferred(obj, args)
    return obj


def _resolve_deferred(obj: Any) -> Any:
  if isinstance(obj, _Deferred):
    return obj.resolve()
  if isinstance(obj, dict):
    for k in list(obj):
      obj[k] = _resolve_deferred(obj[k])
    return obj
  if isinstance(obj, list):
    obj[:] = [_resolve_deferred(v) for v in obj]
    return obj
  if isinstance(obj, tuple):
    return type(obj)(_resolve_deferred(v) for v in obj) if type(obj) is tuple else obj
  if isinstance(obj, InertObject):
    obj.state = _resolve_deferred(obj.state)
    obj.items = _resolve_deferred(obj.items)
    obj.elements = _resolve_deferred(obj.elements)
  return obj


def _finalize(obj: Any) -> Any:
  """Replaces rebuilt NumPy-array stand-ins by their arrays, recursively."""
  if isinstance(obj, _NumpyArray):
    return obj.array
  if isinstance(obj, dict):
    for k in list(obj):
      obj[k] = _finalize(obj[k])
  elif isinstance(obj, list):
    obj[:] = [_finalize(v) for v in obj]
  elif type(obj) is tuple:
    return tuple(_finalize(v) for v in obj)
  return obj


def read_torch_file(path: str | os.PathLike) -> Any:
  """Unpickles a whole `.pth` file safely: tensors -> NumPy, unknown objects -> `InertObject`.

  Raises:
    UnsafeCheckpointError: the pickle asks to call a function not on the allow-list.
    ValueError: the file is not a PyTorch checkpoint.
  """
  path = os.fspath(path)
  if zipfile.is_zipfile(path):
    return _finalize(_read_zip(path))
  return _finalize(_read_legacy(path))


def extract_state_dict(obj: Any, *, source: str = "checkpoint") -> dict[str, np.ndarray]:
  """Finds the model's state dict in an unpickled checkpoint; strips `module.`.

  Accepts the released wrapper (`{'model': state_dict, 'optimizer': ..., 'config': ...}`),
  `{'state_dict': ...}` and bare state dicts.
  """
  sd = obj
  if isinstance(obj, Mapping):
    for key in ("model", "state_dict", "model_state_dict", "module"):
      if isinstance(obj.get(key), Mapping):
        sd = obj[key]
        break
  if not isinstance(sd, Mapping) or not any(isinstance(v, np.ndarray) for v in sd.values()):
    keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise ValueError(f"{source}: no state dict found (top level: {keys}); expected a dict of "
                     "tensors or a dict with a 'model' entry")
  out: dict[str, np.ndarray] = {}
  skipped = []
  for key, value in sd.items():
    if not isinstance(value, np.ndarray):
      skipped.append(key)
      continue
    key = str(key)
    if key.startswith("module."):
      key = key[len("module."):]
    out[key] = value
  if skipped:
    logging.warning("%s: skipped non-tensor state-dict entries %s", source, skipped[:10])
  return out


def load_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads the model state dict of a PyTorch `.pth` file as NumPy arrays.

  No torch import, and nothing from the file is executed (see the module doc).

  Args:
    path: a `.pth` written by `torch.save` (zip format, or the legacy format).

  Returns:
    `{official key: array}` in file order, `module.` prefixes stripped,
    dtypes as stored (bfloat16 as `ml_dtypes.bfloat16`).

  Raises:
    UnsafeCheckpointError: the pickle asks to call a non-allow-listed function.
    ValueError: not a PyTorch checkpoint, or no state dict in it.
  """
  return extract_state_dict(read_torch_file(path), source=os.fspath(path))
