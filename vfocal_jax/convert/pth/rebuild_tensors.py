"""Allow-listed torch rebuild functions: each returns a checked `PendingTensor` (no data read yet).

The view (offset, size, stride) must lie inside its storage; a view that is not
the whole storage charges the copy it will need against `max_tensor_bytes`.
"""
from __future__ import annotations

import math

from vfocal_jax.convert.pth.checks import int_tuple, need_args, to_int
from vfocal_jax.convert.pth.errors import CheckpointFormatError, UnsafeCheckpointError
from vfocal_jax.convert.pth.values import Global, PendingTensor, StorageRef, TorchDtype, describe


def _contiguous(size: tuple, stride: tuple) -> bool:
  expected = 1
  for n, s in zip(reversed(size), reversed(stride)):
    if n != 1 and s != expected:
      return False
    expected *= n
  return True


def _tensor(m, storage, offset, size, stride, dtype=None) -> PendingTensor:
  if not isinstance(storage, StorageRef):
    raise CheckpointFormatError(f"expected a tensor storage, got {describe(storage)}")
  if dtype is None:
    dtype = storage.dtype
  elif isinstance(dtype, TorchDtype):
    dtype = dtype.dtype
  else:
    raise CheckpointFormatError(f"malformed tensor dtype {describe(dtype)}")
  offset = to_int(offset, "tensor storage offset")
  size, stride = int_tuple(size, "size"), int_tuple(stride, "stride")
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
  return PendingTensor(storage, dtype, offset, size, stride, whole)


def h_rebuild_tensor(m, args):
  need_args(args, 4, 4, "torch._utils._rebuild_tensor")
  return _tensor(m, *args)


def h_rebuild_tensor_v2(m, args):
  need_args(args, 6, 7, "torch._utils._rebuild_tensor_v2")
  return _tensor(m, *args[:4])


def h_rebuild_tensor_v3(m, args):
  need_args(args, 7, 8, "torch._utils._rebuild_tensor_v3")
  return _tensor(m, *args[:4], dtype=args[6])


def _pending(value, what: str) -> PendingTensor:
  if not isinstance(value, PendingTensor):
    raise CheckpointFormatError(f"{what} of {describe(value)}: expected a tensor")
  return value


def h_rebuild_parameter(m, args):
  need_args(args, 1, 3, "torch._utils._rebuild_parameter")
  return _pending(args[0], "_rebuild_parameter")


def h_rebuild_parameter_with_state(m, args):
  need_args(args, 4, 4, "torch._utils._rebuild_parameter_with_state")
  return _pending(args[0], "_rebuild_parameter_with_state")


def h_rebuild_from_type_v2(m, args):
  """Tensor subclasses: `func` must itself be an allow-listed tensor rebuild."""
  need_args(args, 4, 4, "torch._tensor._rebuild_from_type_v2")
  func, _, fargs, _ = args
  if not (isinstance(func, Global) and func.kind == "tensor"):
    raise UnsafeCheckpointError(
        f"_rebuild_from_type_v2 asks to call {describe(func)}, which is not a tensor rebuild")
  if type(fargs) is not tuple:
    raise CheckpointFormatError(f"_rebuild_from_type_v2 arguments: {describe(fargs)}")
  return func.handler(m, fargs)


TENSOR_HANDLERS = {
    "_rebuild_tensor": h_rebuild_tensor, "_rebuild_tensor_v2": h_rebuild_tensor_v2,
    "_rebuild_tensor_v3": h_rebuild_tensor_v3, "_rebuild_parameter": h_rebuild_parameter,
    "_rebuild_parameter_with_state": h_rebuild_parameter_with_state,
}
