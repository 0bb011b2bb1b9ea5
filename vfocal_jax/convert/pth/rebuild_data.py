"""Allow-listed globals that rebuild plain data: containers, a few builtins, NumPy values.

Each handler is `handler(machine, args)`: it checks `args` and builds the result
itself (nothing from the file is called). Handlers that copy a container charge
its length against `max_objects` (`machine.units`).
"""
from __future__ import annotations

import collections
import math
import re
from typing import Any

import numpy as np

from vfocal_jax.convert.pth.checks import check_key, int_tuple, need_args, to_int
from vfocal_jax.convert.pth.errors import CheckpointFormatError, UnsafeCheckpointError
from vfocal_jax.convert.pth.values import NumpyArray, NumpyDtype, describe, describe_args, is_inert_class

_MAPPINGS = (dict, collections.OrderedDict)


def _elements(m, value: Any, what: str) -> list:
  """The items of an already materialised container (never a lazy iterable like range)."""
  if type(value) in (list, tuple, set, frozenset) or type(value) in _MAPPINGS:
    m.units(len(value))
    return list(value)
  raise CheckpointFormatError(f"{what} of {describe(value)} is not rebuilt")


def h_list(m, args):
  need_args(args, 0, 1, "list")
  return _elements(m, args[0], "list") if args else []


def h_tuple(m, args):
  need_args(args, 0, 1, "tuple")
  return tuple(_elements(m, args[0], "tuple")) if args else ()


def h_set(m, args, ctor=set):
  need_args(args, 0, 1, ctor.__name__)
  items = _elements(m, args[0], ctor.__name__) if args else []
  for item in items:
    check_key(item, "set element")
  m.units(4)
  return ctor(items)


def h_frozenset(m, args):
  return h_set(m, args, frozenset)


def h_dict(m, args, ctor=dict):
  need_args(args, 0, 1, ctor.__name__)
  out = ctor()
  m.units(2)
  if args:
    source = args[0]
    if type(source) in _MAPPINGS:
      pairs = list(source.items())
    elif type(source) in (list, tuple):
      pairs = source
    else:
      raise CheckpointFormatError(f"{ctor.__name__} of {describe(source)} is not rebuilt")
    m.units(len(pairs))
    for pair in pairs:
      if type(pair) not in (tuple, list) or len(pair) != 2:
        raise CheckpointFormatError(f"{ctor.__name__} item {describe(pair)} is not a pair")
      check_key(pair[0])
      out[pair[0]] = pair[1]
  return out


def h_ordered_dict(m, args):
  return h_dict(m, args, collections.OrderedDict)


def _small_number(value: Any, what: str) -> Any:
  if type(value) is float or type(value) is bool or (
      type(value) is int and value.bit_length() <= 1024):
    return value
  raise CheckpointFormatError(f"{what} argument {describe(value)} is not rebuilt")


def h_complex(m, args):
  need_args(args, 0, 2, "complex")
  return complex(*(_small_number(a, "complex") for a in args))


def h_slice(m, args):
  need_args(args, 1, 3, "slice")
  for a in args:
    if a is not None:
      to_int(a, "slice argument", -2**63, 2**63)
  return slice(*args)


def h_range(m, args):
  need_args(args, 1, 3, "range")
  return range(*(to_int(a, "range argument", -2**63, 2**63) for a in args))


_TEXT_ENCODINGS = ("latin1", "latin-1", "iso-8859-1", "utf-8", "utf8", "ascii")


def h_codecs_encode(m, args):
  need_args(args, 1, 3, "_codecs.encode")
  text = args[0]
  encoding = args[1] if len(args) > 1 else "utf-8"
  errors = args[2] if len(args) > 2 else "strict"
  if type(text) is not str or encoding not in _TEXT_ENCODINGS or errors not in ("strict",):
    raise CheckpointFormatError(f"_codecs.encode{describe_args(args)} is not rebuilt")
  return text.encode(encoding, errors)


def _bytes_like(m, args, ctor):
  need_args(args, 0, 2, ctor.__name__)
  if not args:
    return ctor()
  if len(args) == 1 and type(args[0]) in (bytes, bytearray):
    return ctor(args[0])
  if len(args) == 2 and type(args[0]) is str:
    return ctor(h_codecs_encode(m, args))
  raise CheckpointFormatError(f"{ctor.__name__}{describe_args(args)} is not rebuilt")


def h_bytearray(m, args):
  return _bytes_like(m, args, bytearray)


def h_bytes(m, args):
  return _bytes_like(m, args, bytes)


def _inert_class_arg(cls: Any, what: str) -> type:
  if not is_inert_class(cls):
    raise UnsafeCheckpointError(f"{what} of {describe(cls)} is not allowed")
  return cls


def h_reconstructor(m, args):
  """Protocol 0/1 object reconstruction, for placeholder classes only."""
  need_args(args, 3, 3, "copyreg._reconstructor")
  return m.new_inert(_inert_class_arg(args[0], "copyreg._reconstructor"), args[1:], {})


def h_copyreg_newobj(m, args):
  need_args(args, 1, 1 + 2**16, "copyreg.__newobj__")
  return m.new_inert(_inert_class_arg(args[0], "copyreg.__newobj__"), args[1:], {})


def h_torch_size(m, args):
  need_args(args, 0, 1, "torch.Size")
  return int_tuple(args[0], "size") if args else ()


def h_torch_device(m, args):
  need_args(args, 1, 2, "torch.device")
  if type(args[0]) is not str or len(args[0]) > 64:
    raise CheckpointFormatError(f"torch.device{describe_args(args)} is not rebuilt")
  if len(args) == 2:
    return f"{args[0]}:{to_int(args[1], 'device index', 0, 2**16)}"
  return args[0]


# NumPy data inside checkpoints (e.g. a best-accuracy scalar).

_NUMPY_SPEC = re.compile(r"(b1|[iu][1248]|f[248]|c(8|16)|[SU][0-9]{1,6})")


def h_np_dtype(m, args):
  need_args(args, 1, 3, "numpy.dtype")
  spec = args[0]
  if type(spec) is not str or not _NUMPY_SPEC.fullmatch(spec):
    raise CheckpointFormatError(f"numpy dtype {describe(spec)} is not rebuilt (only numeric, "
                                "bool and string dtypes)")
  return NumpyDtype(np.dtype(spec))


def np_dtype_arg(dtype: Any) -> np.dtype:
  if not isinstance(dtype, NumpyDtype):
    raise CheckpointFormatError(f"expected a numpy dtype, got {describe(dtype)}")
  return dtype.dtype


def _native(array: np.ndarray) -> np.ndarray:
  return array.astype(array.dtype.newbyteorder("="), copy=True)


def h_np_scalar(m, args):
  need_args(args, 1, 2, "numpy scalar")
  dtype = np_dtype_arg(args[0])
  raw = args[1] if len(args) > 1 else None
  if type(raw) not in (bytes, bytearray) or len(raw) != dtype.itemsize:
    raise CheckpointFormatError("only numpy scalars of raw bytes are rebuilt")
  return _native(np.frombuffer(raw, dtype))[0]


def h_np_reconstruct(m, args):
  need_args(args, 3, 3, "numpy _reconstruct")
  return NumpyArray()


def np_array(raw: Any, dtype: np.dtype, shape: Any, fortran: bool) -> np.ndarray:
  shape = int_tuple(shape, "numpy shape")
  if type(raw) not in (bytes, bytearray) or len(raw) != math.prod(shape) * dtype.itemsize:
    raise CheckpointFormatError("only numeric numpy arrays of raw bytes are rebuilt")
  return _native(np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C"))


def h_np_frombuffer(m, args):
  need_args(args, 4, 4, "numpy _frombuffer")
  buf, dtype, shape, order = args
  if order not in ("C", "F"):
    raise CheckpointFormatError(f"numpy array order {describe(order)}")
  return np_array(buf, np_dtype_arg(dtype), shape, order == "F")
