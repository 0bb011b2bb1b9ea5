"""A training workdir's ``config.json`` (and a pre-card ``model.json``): written by ``train``, checked when read back.

These files travel between machines and get hand-edited: ``read_config`` and
``read_legacy_model_fields`` return checked values or raise one
``BadFileError`` naming the file and the field (docs/artifacts.md).
"""
from __future__ import annotations

import os
import re
from typing import Any

import jax
import ml_collections
from absl import logging

from vfocal_jax import errors, file_checks, paths

__all__ = ["CONFIG_FILE", "LEGACY_MODEL_FILE", "write_config", "read_config", "check_config",
           "read_legacy_model_fields"]

CONFIG_FILE = "config.json"


def write_config(workdir: paths.PathLike, config: ml_collections.ConfigDict) -> None:
  """Writes ``workdir/config.json`` (process 0)."""
  if jax.process_index() == 0:
    paths.write_text(paths.resolve(workdir) / CONFIG_FILE, config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(workdir: paths.PathLike) -> ml_collections.ConfigDict:
  """``workdir/config.json`` (``write_config``), checked by ``check_config``; a damaged one is a ``BadFileError``."""
  path = paths.resolve(workdir) / CONFIG_FILE
  return ml_collections.ConfigDict(check_config(paths.read_json(path), os.fspath(path)))


_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def check_config(value: Any, path: str, *, field_prefix: str | None = None) -> dict[str, Any]:
  """A training run's saved config (JSON), checked where commands read it back; the checked dict.

  Eval reads its ``data`` block (the split the run used), a workdir without
  a model card its ``model`` block. So: the file is a JSON object whose field
  names are names; ``data`` and ``model`` are objects; each of their fields
  that this version knows has the type of its default (or is null: unset);
  the fields a model card also holds (``model.embed_dim``,
  ``num_frames``, ``data.mean``, ...) pass the card's checks
  (``model_card.check_fields``). ``data`` fields the file lacks (written by
  an older version) take their defaults, and a warning lists them. Other
  fields are the user's own and pass unchecked.
  """
  from vfocal_jax import model_card  # pylint: disable=import-outside-toplevel
  from vfocal_jax.configs import default  # pylint: disable=import-outside-toplevel
  fc = file_checks
  config = dict(fc.mapping(value, path))
  _check_names(config, path, "")
  defaults = default.get_config()
  for section in ("data", "model"):
    name = section if field_prefix is None else field_prefix
    if section not in config:
      raise fc.BadFileError(path, f"has no {section} object (a config.json written by train always has one)")
    block = dict(fc.mapping(config.get(section, {}), path, name or "the file"))
    for key in block:
      if key in defaults[section]:
        _check_type(block[key], defaults[section][key], defaults[section].get_type(key), path,
                    f"{name}.{key}" if name else key)
    config[section] = block
  missing = [k for k in defaults.data if k not in config["data"]]
  if missing and field_prefix is None:
    logging.warning("%s: data has no %s (written by an older version?); assumed the defaults: %s%s", path,
                    ", ".join(missing), ", ".join(f"{k}={defaults.data[k]!r}" for k in missing[:8]),
                    " ..." if len(missing) > 8 else "")
    config["data"] = {**{k: _plain(defaults.data[k]) for k in missing}, **config["data"]}
  flat = {f"{section}.{k}": v for section in ("data", "model") for k, v in config[section].items()}
  flat.update((k, config[k]) for k in model_card.CLIP_FIELDS + ("test_num_clips", "test_num_crops") if k in config)
  model_card.check_fields({k: v for k, v in flat.items() if v is not None}, path)
  return config


LEGACY_MODEL_FILE = "model.json"  # The architecture of a converted checkpoint written before model cards.


def read_legacy_model_fields(directory: paths.PathLike) -> dict[str, Any]:
  """The model fields of an artifact written before model cards: its ``model.json``, else ``config.json``'s ``model``.

  Checked as ``check_config`` checks a config's ``model`` block (the file a
  ``BadFileError``'s message names); a directory with neither file is a
  ``MissingFileError``.
  """
  root = paths.resolve(directory)
  if (root / LEGACY_MODEL_FILE).exists():
    path = os.fspath(root / LEGACY_MODEL_FILE)
    return check_config({"model": paths.read_json(path), "data": {}}, path, field_prefix="")["model"]
  if (root / CONFIG_FILE).exists():
    return dict(read_config(root).model)
  raise errors.MissingFileError(os.fspath(root), f"no model_card.json, {LEGACY_MODEL_FILE} or {CONFIG_FILE}: "
                                                 "not a converted checkpoint or training workdir of vfocal_jax")


def _plain(value: Any) -> Any:
  return list(value) if isinstance(value, tuple) else value


def _check_names(value: Any, path: str, field: str) -> None:
  for key, item in value.items():
    name = f"{field}.{key}" if field else str(key)
    if not _FIELD_NAME.match(key) or key.startswith("__"):
      raise file_checks.BadFileError(path, f"has the field {name[:80]!r}, which is not a config field name")
    if isinstance(item, dict):
      _check_names(item, path, name)


def _check_type(value: Any, default_value: Any, kind: type, path: str, field: str) -> None:
  """``value`` (JSON) is of the config field's type: bool, int, float (an int too), str, tuple (a list: of the
  default's length and kind of number when the default is a tuple of numbers)."""
  fc = file_checks
  if value is None:  # An unset field: a config may hold None anywhere (the run did with it).
    return
  if kind is bool:
    fc.boolean(value, path, field)
  elif kind is int:
    fc.integer(value, path, field)
  elif kind is float:
    fc.number(value, path, field)
  elif kind is str:
    fc.string(value, path, field)
  elif kind in (tuple, list):
    items = list(default_value or ())
    if items and all(isinstance(v, int) and not isinstance(v, bool) for v in items):
      fc.integers(value, path, field, length=len(items))
    elif items and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
      fc.numbers(value, path, field, length=len(items))
    elif items and all(isinstance(v, str) for v in items):
      fc.strings(value, path, field, max_len=1 << 16)
    else:
      fc.sequence(value, path, field, max_len=1 << 16)
  elif isinstance(default_value, ml_collections.ConfigDict):
    fc.mapping(value, path, field)


