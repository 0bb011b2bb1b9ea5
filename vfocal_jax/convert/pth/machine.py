"""The pickle machine: pickle's stack machine with none of its imports or calls.

`Machine(load, source, persistent_load).run()` reads one pickle from `source`
and returns its object. The opcodes (`opcodes.OPS`) push and pop; everything
that could run code or change shared state goes through the methods below:

* `find_class`: a global resolves through the allow-list, or to a placeholder
  class of this load; nothing is imported.
* `call` (REDUCE, INST, OBJ): only allow-listed handlers run; calling a
  placeholder class is refused with `UnsafeCheckpointError`.
* `new_object`, `build`, `setitem`, `append`: create and fill placeholders and
  plain containers only; allow-listed objects cannot be modified.
* the memo is a dict bounded by `max_memo`; keys and set elements are checked
  before they are hashed (`checks.check_key`).
"""
from __future__ import annotations

import collections
import struct
from typing import Any, Callable

from vfocal_jax.convert.pth.allow_list import ALLOWED, PY2_MODULES
from vfocal_jax.convert.pth.checks import check_key, to_int
from vfocal_jax.convert.pth.errors import (CheckpointFormatError, CheckpointLoadError,
                                           UnsafeCheckpointError, clip, limit_error)
from vfocal_jax.convert.pth.opcodes import OP_NAMES, OPS, STOP
from vfocal_jax.convert.pth.rebuild_data import np_array, np_dtype_arg
from vfocal_jax.convert.pth.source import Source, Truncated
from vfocal_jax.convert.pth.state import Load
from vfocal_jax.convert.pth.values import (Global, InertObject, NumpyArray, NumpyDtype, describe,
                                           describe_args, is_inert_class)

_MAX_NAME = 1000  # characters of a global's module or name


class Machine:
  """Runs one pickle: a stack machine with pickle's opcodes and none of its imports."""

  def __init__(self, loader: Load, src: Source, persistent_load: Callable | None):
    self.loader, self.src, self.persistent_load = loader, src, persistent_load
    self.stack: list = []
    self.metastack: list = []
    self.memo: dict[int, Any] = {}
    self.result: Any = None

  def run(self) -> Any:
    src, ops, loader = self.src, OPS, self.loader
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
        if fn(self) is STOP:
          return self.result
    except Truncated:
      raise CheckpointFormatError(f"the pickle is truncated (near byte {src.tell():,})") from None
    except CheckpointLoadError:
      raise
    except (IndexError, KeyError, TypeError, ValueError, AttributeError, struct.error,
            UnicodeError, OverflowError, EOFError) as e:
      raise CheckpointFormatError(
          f"malformed pickle: opcode {OP_NAMES.get(op, op)} near byte {src.tell():,} failed "
          f"({type(e).__name__})") from None

  def units(self, n: int) -> None:
    self.loader.charge_objects(n)

  def pop_mark(self) -> list:
    items = self.stack
    self.stack = self.metastack.pop()
    return items

  def find_class(self, module: Any, name: Any) -> Any:
    if type(module) is not str or type(name) is not str or not 0 < len(module) <= _MAX_NAME \
        or not 0 < len(name) <= _MAX_NAME:
      raise CheckpointFormatError(f"malformed global {describe(module)} {describe(name)}")
    module = PY2_MODULES.get(module, module)
    allowed = ALLOWED.get((module, name))
    if allowed is not None:
      return allowed
    return self.loader.inert_class(module, name)

  def persistent(self, pid: Any) -> Any:
    if self.persistent_load is None:
      raise CheckpointFormatError(f"unexpected persistent id {describe(pid)}")
    return self.persistent_load(pid)

  def call(self, func: Any, args: Any) -> Any:
    if type(args) is not tuple:
      raise CheckpointFormatError(f"call arguments are {describe(args)}, not a tuple")
    if isinstance(func, Global):
      return func.handler(self, args)
    if is_inert_class(func):
      raise UnsafeCheckpointError(
          f"the pickle asks to call {clip(func._pickle_global, 200)}{describe_args(args)}, "
          "which is not on the allow-list of this loader (only tensors, plain containers and "
          "NumPy data are rebuilt). Nothing was executed. If you trust this file, load it with "
          "torch.load instead and save a plain state dict (torch.save(model.state_dict(), path)).")
    raise CheckpointFormatError(f"the pickle calls {describe(func)}, which is not callable")

  def new_inert(self, cls: type, args: tuple, kwargs: dict) -> InertObject:
    self.units(6)
    obj = object.__new__(cls)
    obj.new_args, obj.new_kwargs = tuple(args), dict(kwargs)
    obj.state, obj.items, obj.elements = None, {}, []
    return obj

  def new_object(self, cls: Any, args: Any, kwargs: Any) -> Any:
    if type(args) is not tuple or type(kwargs) is not dict:
      raise CheckpointFormatError("malformed NEWOBJ arguments")
    if is_inert_class(cls):
      for key in kwargs:
        check_key(key)
      return self.new_inert(cls, args, kwargs)
    if isinstance(cls, Global) and cls.kind == "container" and not kwargs:
      if cls.qualname in ("builtins.tuple", "builtins.frozenset"):
        return cls.handler(self, args)
      return cls.handler(self, ())
    raise CheckpointFormatError(f"NEWOBJ on {describe(cls)} is not allowed")

  def instantiate(self, cls: Any, args: list) -> Any:
    if is_inert_class(cls) and not args:
      return self.new_inert(cls, (), {})
    return self.call(cls, tuple(args))

  def memo_put(self, index: Any, value: Any) -> None:
    index = to_int(index, "memo index", 0, 2**32)
    if index not in self.memo and len(self.memo) >= self.loader.limits.max_memo:
      raise limit_error("max_memo", self.loader.limits.max_memo, "the pickle memo")
    self.memo[index] = value

  def memo_get(self, index: Any) -> Any:
    try:
      return self.memo[index]
    except (KeyError, TypeError):
      raise CheckpointFormatError(f"the pickle reads memo entry {describe(index)}, "
                                  "which was never stored") from None

  def setitem(self, target: Any, key: Any, value: Any) -> None:
    check_key(key)
    t = type(target)
    if t is dict or t is collections.OrderedDict:
      target[key] = value
    elif isinstance(target, InertObject):
      target.items[key] = value
    else:
      raise CheckpointFormatError(f"SETITEM on {describe(target)} is not allowed")

  def append(self, target: Any, values: list) -> None:
    if type(target) is list:
      target.extend(values)
    elif isinstance(target, InertObject):
      target.elements.extend(values)
    else:
      raise CheckpointFormatError(f"APPEND on {describe(target)} is not allowed")

  def build(self, target: Any, state: Any) -> None:
    if isinstance(target, InertObject):
      target.state = state
    elif type(target) is collections.OrderedDict:
      # `state_dict()` carries `_metadata` (version numbers); nothing else is set.
      if type(state) is tuple and len(state) == 2 and state[1] is None:
        state = state[0]
      if type(state) is not dict or any(k != "_metadata" for k in state):
        raise CheckpointFormatError(f"BUILD of an OrderedDict with {describe(state)}")
      if "_metadata" in state:
        target._metadata = state["_metadata"]
    elif isinstance(target, NumpyDtype):
      if type(state) is not tuple or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
        raise CheckpointFormatError("malformed numpy dtype state")
      if any(s is not None for s in state[2:5]):
        raise CheckpointFormatError("structured numpy dtypes are not rebuilt")
      if state[1] in "<>":
        target.dtype = target.dtype.newbyteorder(state[1])
    elif isinstance(target, NumpyArray):
      if type(state) is not tuple or len(state) != 5:
        raise CheckpointFormatError("malformed numpy array state")
      _, shape, dtype, fortran, raw = state
      target.array = np_array(raw, np_dtype_arg(dtype), shape, bool(fortran))
    else:
      raise CheckpointFormatError(
          f"BUILD on {describe(target)} is not allowed (allow-listed objects cannot be modified "
          "by a file)")
