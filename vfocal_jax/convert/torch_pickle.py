"""Reads PyTorch `.pth` checkpoints with NumPy only: no torch, no code from the file.

A `.pth` file is a pickle, and unpickling normally imports and calls whatever
the file names. This module never hands the file to `pickle`: it runs its own
pickle machine (the package `vfocal_jax.convert.pth`, one module per job), which

* rebuilds tensors with re-implementations of the few functions torch pickles
  (`torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`, ...) and reads
  their bytes from the archive (`<folder>/data/<key>` in the zip format; the
  storages after the pickles in the legacy format);
* rebuilds plain containers (dict, OrderedDict, list, tuple, set, ...) and a
  few data types (NumPy scalars and arrays, `torch.Size`, dtypes);
* turns every other global (a yacs `CfgNode`, an `argparse.Namespace`, any
  class of a library that is not installed) into an inert placeholder class:
  the pickle may *create* an instance of it and fill its state, which stores
  data and runs nothing;
* refuses, with `UnsafeCheckpointError` naming it, any attempt to *call* a
  global that is not allow-listed (`os.system`, `builtins.eval`, ...).

The machine is bounded by design (see docs/pth_loader.md): limits on the
pickle's size, nesting depth, memo, object count and on the bytes of tensor
data (checked while inflating, before anything is allocated); allow-listed
objects cannot be modified by a file and every load starts from fresh state;
the archive is read as torch reads it (one archive folder, unique entry names,
`byteorder` exactly `little` or `big`; legacy files that are also zip or tar
archives are refused). Every refusal is a `CheckpointLoadError` whose message
starts with the file name and is bounded in length.

Typical use: `state_dict = load_torch_checkpoint("video-focalnet_tiny.pth")`.
Paths may be local or `gs://...` (opened with `etils.epath`).
"""
from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from vfocal_jax.convert.pth.errors import (CheckpointFormatError, CheckpointLimitError,
                                           CheckpointLoadError, UnsafeCheckpointError, clip)
from vfocal_jax.convert.pth.legacy import LEGACY_MAGIC as _LEGACY_MAGIC  # noqa: F401 (tests)
from vfocal_jax.convert.pth.legacy import read_legacy
from vfocal_jax.convert.pth.state import Limits, Load
from vfocal_jax.convert.pth.state_dict import clean_state_dict, find_state_dict
from vfocal_jax.convert.pth.values import InertObject
from vfocal_jax.convert.pth.zip_format import MAGIC as _ZIP_MAGIC
from vfocal_jax.convert.pth.zip_format import read_zip

__all__ = [
    "CheckpointLoadError", "CheckpointFormatError", "CheckpointLimitError",
    "UnsafeCheckpointError", "InertObject", "load_torch_checkpoint", "read_torch_file",
    "extract_state_dict", "MAX_PICKLE_BYTES", "MAX_DEPTH", "MAX_MEMO", "MAX_OBJECTS",
    "MAX_TENSOR_BYTES", "TENSOR_BYTES_PER_FILE_BYTE", "MIN_TENSOR_BYTES", "MAX_ZIP_ENTRIES",
]

# Limits (module defaults, read at each call; every one can be overridden per call by keyword).

MAX_PICKLE_BYTES = 256 * 2**20
"""Bytes of pickle: `data.pkl` of a zip archive, or all pickles of a legacy file."""
MAX_DEPTH = 256
"""Container nesting depth of the unpickled object."""
MAX_MEMO = 1_000_000
"""Entries in the pickle memo."""
MAX_OBJECTS = 4_000_000
"""Objects created and container slots filled while unpickling (a set, a
placeholder instance or a placeholder class counts as several)."""
MAX_TENSOR_BYTES = 64 * 2**30
"""Absolute cap on the bytes of tensor data: storages read (after inflating)
plus the copies that strided views need."""
TENSOR_BYTES_PER_FILE_BYTE = 4
"""By default the tensor data may also be at most this many times the file
size (or MIN_TENSOR_BYTES, whichever is larger): a small file cannot claim
gigabytes through a compressed record or stride-0 views."""
MIN_TENSOR_BYTES = 256 * 2**20
MAX_ZIP_ENTRIES = 100_000
"""Entries in the zip archive's central directory."""

_LIMIT_NAMES = ("max_pickle_bytes", "max_depth", "max_memo", "max_objects", "max_tensor_bytes",
                "max_zip_entries")


def _open(path: Any) -> Any:
  from etils import epath  # pylint: disable=import-outside-toplevel
  return epath.Path(path).open("rb")


def _limits(overrides: dict[str, int | None], file_size: int) -> Limits:
  """The limits of one load: the keywords given, else the module constants."""
  def pick(name: str, default: int) -> int:
    value = overrides.get(name)
    return default if value is None else value

  tensor_default = min(MAX_TENSOR_BYTES,
                       max(MIN_TENSOR_BYTES, TENSOR_BYTES_PER_FILE_BYTE * file_size))
  return Limits(pick("max_pickle_bytes", MAX_PICKLE_BYTES), pick("max_depth", MAX_DEPTH),
                pick("max_memo", MAX_MEMO), pick("max_objects", MAX_OBJECTS),
                pick("max_tensor_bytes", tensor_default),
                pick("max_zip_entries", MAX_ZIP_ENTRIES))


def read_torch_file(path: str | os.PathLike, *, max_pickle_bytes: int | None = None,
                    max_depth: int | None = None, max_memo: int | None = None,
                    max_objects: int | None = None, max_tensor_bytes: int | None = None,
                    max_zip_entries: int | None = None, verify_crc: bool = False) -> Any:
  """Unpickles a whole `.pth` file safely: tensors -> NumPy, unknown objects -> `InertObject`.

  Args:
    path: a local path or a `gs://` URL (opened with `etils.epath`).
    max_*: override the module's limits (MAX_PICKLE_BYTES, ...); `max_tensor_bytes`
      defaults to min(MAX_TENSOR_BYTES, max(MIN_TENSOR_BYTES,
      TENSOR_BYTES_PER_FILE_BYTE * file size)).
    verify_crc: also check the CRC-32 of stored (uncompressed) tensor records, which
      torch does not (about +50% load time); `data.pkl` and deflated records are
      always checked.

  Returns:
    The unpickled object: tensors as NumPy arrays (tensors that use a whole storage
    share one buffer; shared references stay shared), placeholders for unknown classes.

  Raises:
    UnsafeCheckpointError: the pickle asks to call a function not on the allow-list.
    CheckpointLimitError: the file exceeds a limit (the message names the keyword).
    CheckpointFormatError: not a PyTorch checkpoint, malformed, or unsupported.
    OSError: the file cannot be opened or read.
  """
  overrides = dict(max_pickle_bytes=max_pickle_bytes, max_depth=max_depth, max_memo=max_memo,
                   max_objects=max_objects, max_tensor_bytes=max_tensor_bytes,
                   max_zip_entries=max_zip_entries)
  return _read(path, overrides, verify_crc, None)


def _display(path: Any) -> str:
  return str(os.fspath(path) if isinstance(path, (str, os.PathLike)) else path)


def _read(path: Any, overrides: dict, verify_crc: bool, select: Callable | None) -> Any:
  """Opens the file, tells the format as torch does, and reads it; errors name the file."""
  display = _display(path)
  overrides = {name: None if value is None else int(value) for name, value in overrides.items()}
  with _open(path) as f:
    try:
      size = f.seek(0, 2)
      size = f.tell() if size is None else size
      f.seek(0)
      loader = Load(_limits(overrides, size))
      loader.verify_crc, loader.select = bool(verify_crc), select
      if f.read(4) == _ZIP_MAGIC:
        return read_zip(f, size, loader)
      return read_legacy(f, size, loader)
    except CheckpointLoadError as e:
      raise e.with_path(display) from None
    except OSError:
      raise
    except MemoryError:
      raise CheckpointLimitError("ran out of memory while reading the file", display) from None
    except RecursionError:
      raise CheckpointLimitError("nesting too deep to read", display) from None
    except Exception as e:  # noqa: BLE001 (every other failure is reported as a format error)
      detail = str(e) if all(type(a) is str and len(a) < 200 for a in e.args) else ""
      raise CheckpointFormatError(
          f"unexpected {type(e).__name__} while reading the file: {clip(detail, 200)}",
          display) from e


def extract_state_dict(obj: Any, *, source: str = "checkpoint") -> dict[str, np.ndarray]:
  """Finds the model's state dict in an unpickled checkpoint; strips `module.` / `_orig_mod.`.

  Accepts the released wrapper (`{'model': state_dict, 'optimizer': ..., 'config': ...}`),
  `{'state_dict': ...}` and bare state dicts.

  Raises:
    CheckpointFormatError: no state dict, a key that is not a string, or two keys that
      become the same after the prefixes are stripped.
  """
  try:
    sd = find_state_dict(obj)
  except CheckpointLoadError as e:
    raise e.with_path(source) from None
  return clean_state_dict(sd, source)


def load_torch_checkpoint(path: str | os.PathLike, *, verify_crc: bool = False,
                          **limits: int | None) -> dict[str, np.ndarray]:
  """Reads the model state dict of a PyTorch `.pth` file as NumPy arrays.

  No torch import, and nothing from the file is executed (see the module doc). Only
  the state dict's storages are read (not, e.g., the optimizer's).

  Args:
    path: a `.pth` written by `torch.save` (zip format, or the legacy format); a local
      path or a `gs://` URL.
    verify_crc: as for `read_torch_file`.
    **limits: `max_pickle_bytes`, `max_depth`, ... as for `read_torch_file`.

  Returns:
    `{official key: array}` in file order, `module.` / `_orig_mod.` prefixes
    stripped, dtypes as stored (bfloat16 as `ml_dtypes.bfloat16`).

  Raises:
    CheckpointLoadError (UnsafeCheckpointError, CheckpointLimitError,
    CheckpointFormatError): see `read_torch_file`; also no state dict, non-string
    keys, or keys that collide once prefixes are stripped.
    OSError: the file cannot be opened or read.
  """
  unknown = sorted(set(limits) - set(_LIMIT_NAMES))
  if unknown:
    raise TypeError(f"load_torch_checkpoint: unexpected arguments {unknown}")
  return clean_state_dict(_read(path, limits, verify_crc, find_state_dict), _display(path))
