"""The allow-list: what each global a pickle may name resolves to.

A global on the list resolves to an immutable `Global` (a handler that rebuilds
the result from checked arguments), a `StorageType` or a `TorchDtype`. Every
other global resolves to a fresh placeholder class of this load
(`state.Load.inert_class`): the pickle may create and fill instances of it,
and calling it is refused. Nothing is ever imported.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from vfocal_jax.convert.pth import rebuild_data as data
from vfocal_jax.convert.pth.rebuild_tensors import TENSOR_HANDLERS, h_rebuild_from_type_v2
from vfocal_jax.convert.pth.values import Global, StorageType, TorchDtype

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}

TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16,
    "short": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
    "complex64": np.complex64, "cfloat": np.complex64, "complex128": np.complex128,
    "cdouble": np.complex128, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
}

PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}  # protocol-2 pickles use these


def _allow_list() -> dict[tuple[str, str], object]:
  table: dict[tuple[str, str], object] = {}

  def add(module, name, handler, kind="function"):
    table[(module, name)] = Global(f"{module}.{name}", handler, kind)

  add("collections", "OrderedDict", data.h_ordered_dict, "container")
  for name, handler in [("dict", data.h_dict), ("list", data.h_list), ("tuple", data.h_tuple),
                        ("set", data.h_set), ("frozenset", data.h_frozenset)]:
    add("builtins", name, handler, "container")
  for name, handler in [("complex", data.h_complex), ("slice", data.h_slice),
                        ("range", data.h_range), ("bytearray", data.h_bytearray),
                        ("bytes", data.h_bytes)]:
    add("builtins", name, handler)
  add("_codecs", "encode", data.h_codecs_encode)
  add("copyreg", "_reconstructor", data.h_reconstructor)
  add("copyreg", "__newobj__", data.h_copyreg_newobj)
  for name, handler in TENSOR_HANDLERS.items():
    add("torch._utils", name, handler, "tensor")
  add("torch._tensor", "_rebuild_from_type_v2", h_rebuild_from_type_v2)
  add("torch", "Size", data.h_torch_size)
  add("torch", "device", data.h_torch_device)
  add("numpy", "dtype", data.h_np_dtype)
  for core in ("numpy.core", "numpy._core"):
    add(f"{core}.multiarray", "scalar", data.h_np_scalar)
    add(f"{core}.multiarray", "_reconstruct", data.h_np_reconstruct)
    add(f"{core}.numeric", "_frombuffer", data.h_np_frombuffer)
  for name, dtype in STORAGE_DTYPES.items():
    for module in ("torch", "torch.cuda"):
      table[(module, name)] = StorageType(name, dtype)
  table[("torch.storage", "UntypedStorage")] = table[("torch", "UntypedStorage")]
  for name, dtype in TORCH_DTYPES.items():
    table[("torch", name)] = TorchDtype(name, dtype)
  return table


ALLOWED = _allow_list()
