"""The loader's exceptions: every refusal is a `CheckpointLoadError` naming the file."""
from __future__ import annotations

import pickle

from vfocal_jax import errors


def clip(text: str, n: int = 300) -> str:
  """`text`, cut to `n` characters with a note of its length."""
  return text if len(text) <= n else text[:n] + f"... ({len(text)} chars)"


class CheckpointLoadError(errors.UserError, ValueError, pickle.UnpicklingError):
  """The file cannot be read as a PyTorch checkpoint (base class of every refusal).

  The message is `"<path>: <reason>"`, bounded in length. Attributes:
  `path` (the file, None until known) and `reason`. A `UserError` (the command
  line prints it as one line, exit status 2), a `ValueError`, and a
  `pickle.UnpicklingError` (what the earlier loader raised).
  """

  def __init__(self, reason: str, path: str | None = None):
    self.reason = clip(str(reason), 2000)
    self.path = path
    super().__init__(self._text())

  def _text(self) -> str:
    return f"{clip(self.path, 1000)}: {self.reason}" if self.path else self.reason

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


def limit_error(limit: str, value: int, what: str) -> CheckpointLimitError:
  return CheckpointLimitError(
      f"{what} exceeds {limit}={value:,} (pass {limit}=... to read_torch_file / "
      "load_torch_checkpoint if you trust this file)", limit=limit)
