"""The legacy format (torch < 1.6, or `torch.save(..., _use_new_zipfile_serialization=False)`).

Five pickles (magic number, protocol 1001, sys_info, the object, the storage
keys), then each storage as an 8-byte element count and its bytes. Refused
because torch or other tools would read such a file differently: a first
block that is a tar header (the pre-0.4 format), a file that also ends like a
zip archive, storages listed twice or not listed, trailing data.
"""
from __future__ import annotations

import struct
import tarfile
from typing import Any

from vfocal_jax.convert.pth.errors import (CheckpointFormatError, CheckpointLimitError,
                                           UnsafeCheckpointError, clip)
from vfocal_jax.convert.pth.graph import finish
from vfocal_jax.convert.pth.machine import Machine
from vfocal_jax.convert.pth.source import Source, read_exact
from vfocal_jax.convert.pth.state import Load
from vfocal_jax.convert.pth.values import describe
from vfocal_jax.convert.pth.zip_format import CENTRAL, END, END_FMT

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


def has_zip_trailer(f: Any, size: int) -> bool:
  """Whether a zip reader would find an archive at the end of the file.

  Looks for an end-of-central-directory record in the last 64 KiB whose comment
  length reaches the end of the file, or which points at a central directory
  (where it says, as miniz reads it, or just before itself, as Python's zipfile
  does), or which defers to zip64.
  """
  start = max(0, size - (1 << 16) - END_FMT.size)
  f.seek(start)
  tail = read_exact(f, size - start)
  i = len(tail)
  while True:
    i = tail.rfind(END, 0, i)
    if i < 0:
      return False
    if i + END_FMT.size > len(tail):
      continue
    _, _, _, _, _, cd_size, cd_offset, comment = END_FMT.unpack(tail[i:i + END_FMT.size])
    if i + END_FMT.size + comment == len(tail) or 0xFFFFFFFF in (cd_size, cd_offset):
      return True
    for where in (cd_offset, start + i - cd_size):
      if 0 <= where <= size - 4:
        f.seek(where)
        if f.read(4) == CENTRAL:
          return True


def _is_tar(head: bytes) -> bool:
  if len(head) < 512:
    return False
  try:
    tarfile.TarInfo.frombuf(head[:512], tarfile.ENCODING, "surrogateescape")
  except Exception:  # noqa: BLE001 (not a tar header)
    return False
  return True


def _read_header(f: Any, size: int, loader: Load) -> Source:
  """Checks the magic number, protocol and sys_info; returns the source at the object."""
  limits = loader.limits
  f.seek(0)
  if _is_tar(f.read(512)):
    raise CheckpointFormatError("a tar archive (the pre-0.4 torch format, which torch reads "
                                "differently): not supported")
  f.seek(0)
  src = Source(f=f, start=0, end=min(size, limits.max_pickle_bytes),
               limited=size > limits.max_pickle_bytes)
  try:
    magic = Machine(loader, src, None).run()
  except (UnsafeCheckpointError, CheckpointLimitError):
    raise
  except CheckpointFormatError as e:
    raise CheckpointFormatError(
        f"not a PyTorch checkpoint (neither a zip archive nor the legacy format: {e.reason})"
    ) from None
  if type(magic) is not int or magic != LEGACY_MAGIC:
    raise CheckpointFormatError("not a PyTorch checkpoint (no zip archive, no legacy magic "
                                "number)")
  protocol = Machine(loader, src, None).run()
  if type(protocol) is not int or protocol != LEGACY_PROTOCOL:
    raise CheckpointFormatError(f"unsupported legacy protocol version {describe(protocol)}")
  Machine(loader, src, None).run()  # sys_info: informational (storages are little-endian)
  if has_zip_trailer(f, size):
    raise CheckpointFormatError(
        "a legacy-format checkpoint that also ends like a zip archive (torch reads the legacy "
        "pickle, zip tools the archive): refused")
  f.seek(src.next_offset())
  return src


def _storage_keys(src: Source, loader: Load, size: int) -> list[str]:
  """The pickled list of storage keys: each referenced storage once, and nothing after them."""
  keys = Machine(loader, src, None).run()
  if type(keys) is not list or any(type(k) is not str for k in keys):
    raise CheckpointFormatError("malformed list of storage keys")
  if len(set(keys)) != len(keys):
    raise CheckpointFormatError("a storage key is listed twice")
  if set(keys) != set(loader.storages):
    unlisted = sorted(set(loader.storages) - set(keys))[:3]
    unknown = sorted(set(keys) - set(loader.storages))[:3]
    raise CheckpointFormatError(
        f"storages referenced but not stored: {[clip(k, 40) for k in unlisted]}; stored but "
        f"not referenced: {[clip(k, 40) for k in unknown]}")
  total = sum(8 + loader.storages[k].nbytes for k in keys)
  if src.tell() + total != size:
    raise CheckpointFormatError(
        f"the storages take {total:,} bytes after byte {src.tell():,}, the file has "
        f"{size - src.tell():,} (truncated, or trailing data)")
  return keys


def read_legacy(f: Any, size: int, loader: Load) -> Any:
  """Reads a legacy-format checkpoint: its pickles through the machine, then the storages."""
  src = _read_header(f, size, loader)

  def persistent_load(pid):
    if type(pid) is not tuple or not pid or pid[0] not in ("storage", b"storage"):
      if type(pid) is tuple and pid and pid[0] in ("module", b"module"):
        raise CheckpointFormatError("the file pickles a whole nn.Module (with its source code); "
                                    "only state dicts and plain data are read")
      raise CheckpointFormatError(f"unsupported persistent id {describe(pid)}")
    if len(pid) != 6:
      raise CheckpointFormatError(f"malformed storage id {describe(pid)}")
    _, storage_type, key, location, numel, view = pid
    if type(location) not in (str, bytes):
      raise CheckpointFormatError(f"malformed storage location {describe(location)}")
    if view is not None:
      raise CheckpointFormatError("legacy storage views are not supported")
    ref = loader.storage(key, storage_type, numel)
    if ref.nbytes > size:
      raise CheckpointFormatError(f"storage {describe(key)} is larger than the file")
    return ref

  root = Machine(loader, src, persistent_load).run()
  keys = _storage_keys(src, loader, size)

  def read_storages(refs, dest_for):
    wanted = {ref.key for ref in refs}
    for key in keys:
      ref = loader.storages[key]
      header = bytearray(8)
      src.readinto(memoryview(header))
      (count,) = struct.unpack("<q", header)
      if count != ref.numel:
        raise CheckpointFormatError(
            f"storage {describe(key)}: {count:,} elements on disk, {ref.numel:,} expected")
      if key in wanted:
        raw = dest_for(ref)
        src.readinto(memoryview(raw))
        yield ref, raw
      else:
        src.skip(ref.nbytes)

  return finish(loader, root, read_storages)
