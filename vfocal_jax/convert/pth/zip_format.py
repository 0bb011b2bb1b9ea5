"""The zip format (torch >= 1.6): `<folder>/data.pkl`, `<folder>/byteorder`, `<folder>/data/<key>`.

The archive is checked so that it means to us what it means to torch (miniz):
the central directory is where the trailer says, the trailer's entry count is
what the directory holds (counted before `zipfile` parses it), one archive
folder, unique entry names, no NUL in names, only stored or deflated records,
`byteorder` exactly `little` or `big`. Records are read by their local header,
streamed, and a deflated record stops inflating past the bytes it should hold.

From `zipfile` only its public `ZipFile` and `ZipInfo` are used; the trailer and
local headers are read here from the layouts of the zip specification (APPNOTE).
"""
from __future__ import annotations

import struct
import zipfile
import zlib
from typing import Any, NamedTuple

from vfocal_jax.convert.pth.errors import CheckpointFormatError, limit_error
from vfocal_jax.convert.pth.graph import finish
from vfocal_jax.convert.pth.machine import Machine
from vfocal_jax.convert.pth.source import CHUNK, Source, read_exact, readinto_exact
from vfocal_jax.convert.pth.state import Limits, Load
from vfocal_jax.convert.pth.values import describe

MAGIC = b"PK\x03\x04"  # a local file header: how torch tells a zip checkpoint
CENTRAL = b"PK\x01\x02"
END = b"PK\x05\x06"
END_FMT = struct.Struct("<4s4H2LH")  # signature, disks, entries here and in all, size, offset, comment
_END64, _END64_FMT = b"PK\x06\x06", struct.Struct("<4sQ2H2L4Q")
_LOCATOR64, _LOCATOR64_FMT = b"PK\x06\x07", struct.Struct("<4sLQL")


class EndRecord(NamedTuple):
  entries: int
  cd_size: int
  cd_offset: int
  at: int  # file offset of the end-of-central-directory record
  zip64: bool


def end_record(f: Any, size: int) -> EndRecord | None:
  """The trailer as Python's zipfile finds it: the last 22 bytes, else the last record in the
  final 64 KiB; then the zip64 record if a locator precedes it."""
  if size < END_FMT.size:
    return None
  f.seek(size - END_FMT.size)
  data, at = f.read(END_FMT.size), size - END_FMT.size
  if not (len(data) == END_FMT.size and data[:4] == END and data[-2:] == b"\0\0"):
    start = max(size - (1 << 16) - END_FMT.size, 0)
    f.seek(start)
    tail = read_exact(f, size - start)
    i = tail.rfind(END)
    if i < 0 or i + END_FMT.size > len(tail):
      return None
    data, at = tail[i:i + END_FMT.size], start + i
  _, _, _, _, entries, cd_size, cd_offset, _ = END_FMT.unpack(data)
  if at < _LOCATOR64_FMT.size:
    return EndRecord(entries, cd_size, cd_offset, at, False)
  f.seek(at - _LOCATOR64_FMT.size)
  locator = f.read(_LOCATOR64_FMT.size)
  if len(locator) != _LOCATOR64_FMT.size or locator[:4] != _LOCATOR64:
    return EndRecord(entries, cd_size, cd_offset, at, False)
  _, disk, _, disks = _LOCATOR64_FMT.unpack(locator)
  if disk != 0 or disks > 1 or at < _LOCATOR64_FMT.size + _END64_FMT.size:
    raise CheckpointFormatError("a zip archive over several disks, or a malformed zip64 trailer")
  f.seek(at - _LOCATOR64_FMT.size - _END64_FMT.size)
  record = f.read(_END64_FMT.size)
  if len(record) != _END64_FMT.size or record[:4] != _END64:
    return EndRecord(entries, cd_size, cd_offset, at, False)
  fields = _END64_FMT.unpack(record)
  return EndRecord(fields[7], fields[8], fields[9], at, True)


def _raw_name(info: zipfile.ZipInfo) -> bytes:
  return info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")


def _count_directory(f: Any, end: EndRecord, limits: Limits) -> None:
  """Counts the central directory's records before zipfile parses them all."""
  f.seek(end.cd_offset)
  directory, count, at = read_exact(f, end.cd_size), 0, 0
  while at < end.cd_size:
    if directory[at:at + 4] != CENTRAL or at + 46 > end.cd_size:
      raise CheckpointFormatError(f"malformed zip central directory (record {count})")
    name_len, extra_len, comment_len = struct.unpack_from("<3H", directory, at + 28)
    at += 46 + name_len + extra_len + comment_len
    count += 1
    if count > limits.max_zip_entries:
      raise limit_error("max_zip_entries", limits.max_zip_entries, "the zip entries")
  if count != end.entries:
    raise CheckpointFormatError(
        f"the zip trailer counts {end.entries:,} entries, the central directory holds {count:,}")


class ZipArchive:
  """The central directory, checked so that it means what it means to torch (miniz)."""

  def __init__(self, f: Any, size: int, limits: Limits):
    self.f, self.size = f, size
    try:
      end = end_record(f, size)
    except (OSError, ValueError, struct.error) as e:
      raise CheckpointFormatError(f"unreadable zip trailer ({type(e).__name__})") from None
    if end is None:
      raise CheckpointFormatError("starts like a zip archive but has no end-of-central-directory "
                                  "record (truncated?)")
    concat = end.at - end.cd_size - end.cd_offset
    if end.zip64:
      concat -= _END64_FMT.size + _LOCATOR64_FMT.size
    if concat != 0:
      raise CheckpointFormatError(
          f"zip central directory is {concat:,} bytes away from where its trailer says "
          "(torch and Python's zipfile would read different archives)")
    if end.entries > limits.max_zip_entries or end.cd_size > 1024 * limits.max_zip_entries:
      raise limit_error("max_zip_entries", limits.max_zip_entries, f"{end.entries:,} zip entries")
    if not 0 <= end.cd_offset <= end.cd_offset + end.cd_size <= size:
      raise CheckpointFormatError("zip central directory out of the file")
    _count_directory(f, end, limits)
    try:
      infos = zipfile.ZipFile(f).infolist()
    except Exception as e:  # noqa: BLE001 (zipfile raises many types on corrupt input)
      if isinstance(e, MemoryError):
        raise
      raise CheckpointFormatError(f"not a readable zip archive ({type(e).__name__})") from None
    if len(infos) != end.entries:
      raise CheckpointFormatError(f"the zip trailer counts {end.entries:,} entries, the central "
                                  f"directory holds {len(infos):,}")
    if not infos:
      raise CheckpointFormatError("an empty zip archive: not a PyTorch checkpoint")
    self._index(infos)

  def _index(self, infos: list[zipfile.ZipInfo]) -> None:
    first = infos[0].filename
    folder = first.split("/", 1)[0]
    if "/" not in first or not folder:
      raise CheckpointFormatError(
          f"zip entry {describe(first)} is not in an archive folder: not a PyTorch checkpoint")
    self.prefix = folder + "/"
    self.records: dict[str, zipfile.ZipInfo] = {}
    raw_names = set()
    for info in infos:
      name = info.filename
      if info.orig_filename != name:
        raise CheckpointFormatError(f"zip entry name {describe(info.orig_filename)} has a NUL")
      if not name.startswith(self.prefix):
        raise CheckpointFormatError(
            f"zip entries in two archive folders ({describe(self.prefix)} and "
            f"{describe(name)}); torch refuses such archives")
      raw = _raw_name(info)
      if name in self.records or raw in raw_names:
        raise CheckpointFormatError(
            f"duplicate zip entry {describe(name)} (torch reads the first, other tools the last)")
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
    header = read_exact(f, 30)
    if header[:4] != MAGIC:
      raise CheckpointFormatError(f"{what}: bad zip local header")
    name_len, extra_len = struct.unpack_from("<2H", header, 26)
    if read_exact(f, name_len) != _raw_name(info):
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
        k = min(n - got, 64 * CHUNK)
        readinto_exact(f, dest[got:got + k])
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
        pending = read_exact(f, min(left, CHUNK))
        left -= len(pending)
      try:
        out = inflater.decompress(pending, min(n - got, CHUNK) + 1)
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


def _byteswap(buf, dtype) -> None:
  unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
  if unit > 1:
    usable = buf.size - buf.size % unit
    buf[:usable].view(f"u{unit}").byteswap(inplace=True)


def _byteorder_is_big(archive: ZipArchive) -> bool:
  order = archive.get("byteorder")
  if order is None:
    return False
  if order.file_size > 16:
    raise CheckpointFormatError("unknown byteorder record")
  value = bytearray(order.file_size)
  archive.read(order, memoryview(value), "byteorder")
  if value not in (b"little", b"big"):
    raise CheckpointFormatError(f"unknown byteorder {describe(bytes(value))} (torch accepts "
                                "exactly 'little' or 'big')")
  return value == b"big"


def read_zip(f: Any, size: int, loader: Load) -> Any:
  """Reads a zip-format checkpoint: `data.pkl` through the machine, then the storages it uses."""
  limits = loader.limits
  archive = ZipArchive(f, size, limits)
  pkl = archive.get("data.pkl")
  if pkl is None:
    raise CheckpointFormatError(
        f"a zip archive without {describe(archive.prefix + 'data.pkl')}: not a PyTorch checkpoint")
  if pkl.file_size > limits.max_pickle_bytes:
    raise limit_error("max_pickle_bytes", limits.max_pickle_bytes,
                      f"data.pkl ({pkl.file_size:,} bytes)")
  data = bytearray(pkl.file_size)
  archive.read(pkl, memoryview(data), "data.pkl")
  big = _byteorder_is_big(archive)

  def storage_record(key, dtype, numel):
    info = archive.get(f"data/{key}")
    if info is None:
      raise CheckpointFormatError(f"storage {describe(key)} is missing from the archive")
    if info.file_size != numel * dtype.itemsize:
      raise CheckpointFormatError(
          f"storage {describe(key)}: record size ({info.file_size:,} bytes) does not match the "
          f"expected size ({numel * dtype.itemsize:,} bytes)")
    return info

  loader.storage_record = storage_record

  def persistent_load(pid):
    if type(pid) is not tuple or len(pid) != 5 or pid[0] not in ("storage", b"storage"):
      raise CheckpointFormatError(f"unsupported persistent id {describe(pid)}")
    _, storage_type, key, location, numel = pid
    if type(location) not in (str, bytes):
      raise CheckpointFormatError(f"malformed storage location {describe(location)}")
    return loader.storage(key, storage_type, numel)

  root = Machine(loader, Source(bytes(data)), persistent_load).run()
  del data

  def read_storages(refs, dest_for):
    for ref in sorted(refs, key=lambda r: r.record.header_offset):
      raw = dest_for(ref)
      archive.read(ref.record, memoryview(raw), f"storage {describe(ref.key)}",
                   loader.verify_crc)
      if big:
        _byteswap(raw, ref.dtype)
      yield ref, raw

  return finish(loader, root, read_storages)
