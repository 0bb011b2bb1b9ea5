"""The state of one load: its limits and counters, placeholder classes and storages.

Every load starts from a fresh `Load`, shared by the pickles of one file, so no
file can change how a later file is read.
"""
from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple

import numpy as np

from vfocal_jax.convert.pth.checks import to_int
from vfocal_jax.convert.pth.errors import CheckpointFormatError, limit_error
from vfocal_jax.convert.pth.values import InertMeta, InertObject, StorageRef, StorageType, describe

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_]")
_TENSOR_DATA = "tensor data (storages and view copies)"


class Limits(NamedTuple):
  """The limits of one load (docs/pth_loader.md#limits); `torch_pickle` fills in the defaults."""
  max_pickle_bytes: int
  max_depth: int
  max_memo: int
  max_objects: int
  max_tensor_bytes: int
  max_zip_entries: int


class Load:
  """Limits and counters shared by the pickles of one file, placeholder classes, storages.

  The format reader sets `storage_record` (the zip record of a storage key) and
  the API sets `verify_crc` and `select` (the part of the object to materialise).
  """

  def __init__(self, limits: Limits):
    self.limits = limits
    self.objects = 0
    self.inert: dict[tuple[str, str], type] = {}
    self.storages: dict[str, StorageRef] = {}
    self.tensor_bytes = 0
    self.storage_record: Callable[[str, np.dtype, int], Any] | None = None
    self.verify_crc = False
    self.select: Callable[[Any], Any] | None = None

  def charge_objects(self, n: int) -> None:
    self.objects += n
    if self.objects > self.limits.max_objects:
      raise limit_error("max_objects", self.limits.max_objects, "objects created by the pickle")

  def charge_bytes(self, nbytes: int, what: str = _TENSOR_DATA) -> None:
    self.tensor_bytes += nbytes
    if self.tensor_bytes > self.limits.max_tensor_bytes:
      raise limit_error("max_tensor_bytes", self.limits.max_tensor_bytes,
                        f"{what} ({self.tensor_bytes:,} bytes)")

  def inert_class(self, module: str, name: str) -> type:
    """The placeholder class of global `module.name`, made once per load."""
    key = (module, name)
    cls = self.inert.get(key)
    if cls is None:
      self.charge_objects(16)
      class_name = _SAFE_NAME.sub("_", name)[:100] or "Inert"
      if not class_name[0].isalpha():
        class_name = "Inert_" + class_name
      cls = InertMeta(class_name, (InertObject,),
                      {"_pickle_global": f"{module}.{name}", "__module__": InertObject.__module__})
      self.inert[key] = cls
    return cls

  def storage(self, key: Any, storage_type: Any, numel: Any) -> StorageRef:
    """The storage a persistent id names: one per key, its bytes charged once."""
    if type(key) is not str or not key or len(key) > 200:
      raise CheckpointFormatError(f"malformed storage key {describe(key)}")
    if not isinstance(storage_type, StorageType):
      raise CheckpointFormatError(f"unsupported storage type {describe(storage_type)}")
    numel = to_int(numel, "storage size")
    ref = self.storages.get(key)
    if ref is not None:
      if ref.dtype != storage_type.dtype or ref.numel != numel:
        raise CheckpointFormatError(
            f"storage {key!r} is referenced with two different types or sizes")
      return ref
    ref = StorageRef(key, storage_type.dtype, numel)
    if self.storage_record is not None:
      ref.record = self.storage_record(key, storage_type.dtype, numel)
    self.charge_bytes(ref.nbytes)
    self.charge_objects(4)
    self.storages[key] = ref
    return ref
