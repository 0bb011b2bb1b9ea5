"""One path type for every file a user names: a local path or a ``gs://`` URL.

Everything the library reads or writes goes through ``etils.epath`` (what
Orbax uses; TensorFlow's filesystem behind it for ``gs://``), never through
``os.path`` / ``open`` / ``glob`` on a user's path, so ``--workdir=gs://b/run``
stays a URL instead of becoming ``<cwd>/gs:/b/run``.
"""
from __future__ import annotations

import json
import os
from typing import Any

from etils import epath

from vfocal_jax import errors

__all__ = ["is_url", "resolve", "join", "exists", "read_text", "write_text", "read_json", "write_json",
           "read_bytes", "makedirs"]

PathLike = str | os.PathLike


def is_url(path: PathLike) -> bool:
  """Whether ``path`` has a scheme (``gs://``, ``s3://`` ...) rather than naming a local file."""
  return "://" in os.fspath(path)


def resolve(path: PathLike) -> epath.Path:
  """``path`` as an ``epath.Path``: local paths made absolute (and ``~`` expanded), URLs kept."""
  text = os.fspath(path)
  if is_url(text):
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def join(path: PathLike, *parts: str) -> str:
  """``path / part / ...`` as a string, for URLs and local paths alike."""
  return os.fspath(resolve(path).joinpath(*parts))


def exists(path: PathLike) -> bool:
  return resolve(path).exists()


def makedirs(path: PathLike) -> epath.Path:
  directory = resolve(path)
  directory.mkdir(parents=True, exist_ok=True)
  return directory


def read_text(path: PathLike) -> str:
  return read_bytes(path).decode("utf-8")


def read_bytes(path: PathLike) -> bytes:
  """The file's bytes; a path that holds no file is a ``MissingFileError`` (a user error) naming it."""
  target = resolve(path)
  try:
    return target.read_bytes()
  except (FileNotFoundError, NotADirectoryError) as e:
    raise errors.MissingFileError(os.fspath(target)) from e
  except IsADirectoryError as e:
    raise errors.MissingFileError(os.fspath(target), "a directory, expected a file") from e


def write_text(path: PathLike, text: str) -> str:
  """Writes ``text`` (creating the parent directory); returns the path written."""
  target = resolve(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_text(text, encoding="utf-8")
  return os.fspath(target)


def read_json(path: PathLike) -> Any:
  """The JSON value of a file; a damaged one (empty, truncated, binary, too deep) is a ``BadFileError`` naming it."""
  from vfocal_jax import file_checks  # pylint: disable=import-outside-toplevel
  return file_checks.parse_json(read_bytes(path), os.fspath(resolve(path)))


def write_json(path: PathLike, value: Any) -> str:
  return write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")
