"""Reading bytes: exact reads from a file object, and the byte source of the pickle machine.

File objects need only `read`, `seek` and `tell` (`readinto` is used when there),
as TensorFlow's `gs://` files offer.
"""
from __future__ import annotations

from typing import Any

from vfocal_jax.convert.pth.errors import CheckpointFormatError, limit_error

CHUNK = 8 * 2**20


class Truncated(Exception):
  """The pickle ends before its STOP (internal: the machine reports it with a position)."""


def read_exact(f: Any, n: int) -> bytes:
  parts, left = [], n
  while left > 0:
    chunk = f.read(min(left, CHUNK))
    if not chunk:
      raise CheckpointFormatError(f"the file is truncated ({n - left:,} of {n:,} bytes read)")
    parts.append(chunk)
    left -= len(chunk)
  return b"".join(parts)


def readinto_exact(f: Any, view: memoryview) -> None:
  got, n = 0, len(view)
  readinto = getattr(f, "readinto", None)
  while got < n:
    if readinto is not None:
      k = readinto(view[got:got + CHUNK * 8])
    else:
      data = f.read(min(n - got, CHUNK))
      k = len(data) if data else 0
      view[got:got + k] = data
    if not k:
      raise CheckpointFormatError(f"the file is truncated ({got:,} of {n:,} bytes read)")
    got += k


class Source:
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
        raise limit_error("max_pickle_bytes", self.end, "the pickle")
      raise Truncated()
    rest = self.buf[self.pos:]
    want = min(max(n - len(rest), CHUNK), self.end - self.base - len(self.buf))
    self.buf = rest + read_exact(self.f, want)
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
      readinto_exact(self.f, view[k:])
      self.base, self.buf, self.pos = self.base + self.pos + len(view) - k, b"", 0

  def next_offset(self) -> int:
    """The file offset where the source's next read from the file continues."""
    return self.base + len(self.buf)
