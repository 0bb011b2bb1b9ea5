"""The converted-checkpoint format: model parameters plus the kwargs that build the model.

A converted checkpoint is a directory:

    DIR/params/      Orbax `StandardCheckpointer` checkpoint of the params pytree
    DIR/model.json   the kwargs of `vfocal_jax.models.create_model` (variant + overrides)

`main.py convert` writes it; eval, predict, visualize and fine-tuning read it
with `load_params`. It holds no optimizer state and no training config, so it
is also what to publish.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

__all__ = ["save_params", "load_params", "is_converted_checkpoint", "jsonable_kwargs"]

_PARAMS = "params"
_MODEL_JSON = "model.json"


def jsonable_kwargs(model_kwargs: dict[str, Any]) -> dict[str, Any]:
  """Model kwargs as JSON values: tuples -> lists, dtypes -> their names."""

  def convert(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
      return [convert(v) for v in value]
    if isinstance(value, dict):
      return {str(k): convert(v) for k, v in value.items()}
    if isinstance(value, (bool, int, float, str)) or value is None:
      return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
      return value.item()
    try:
      return np.dtype(value).name
    except TypeError as e:
      raise TypeError(f"model kwarg value {value!r} cannot be stored in {_MODEL_JSON}") from e

  return {str(k): convert(v) for k, v in model_kwargs.items()}


def _from_json(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(_from_json(v) for v in value)
  if isinstance(value, dict):
    return {k: _from_json(v) for k, v in value.items()}
  return value


def save_params(directory: str | os.PathLike, params: Any, model_kwargs: dict[str, Any]) -> str:
  """Writes `params` (a pytree of arrays) and `model_kwargs` to a new `directory`.

  Args:
    directory: created if absent; must not already hold a checkpoint.
    params: the `'params'` collection (not the whole variables dict).
    model_kwargs: `create_model(**model_kwargs)` rebuilds the model.

  Returns:
    The absolute directory path.
  """
  directory = epath.Path(os.path.abspath(os.fspath(directory)))
  if (directory / _PARAMS).exists():
    raise FileExistsError(f"{directory / _PARAMS} already exists: choose a new --output_dir "
                          "or delete the old checkpoint")
  if isinstance(params, dict) and set(params) == {"params"}:
    raise ValueError("save_params takes the 'params' collection, not {'params': ...}")
  directory.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / _PARAMS, params)
  checkpointer.wait_until_finished()
  (directory / _MODEL_JSON).write_text(json.dumps(jsonable_kwargs(model_kwargs), indent=2) + "\n")
  return os.fspath(directory)


def is_converted_checkpoint(directory: str | os.PathLike) -> bool:
  """Whether `directory` looks like the output of `save_params`."""
  directory = epath.Path(os.path.abspath(os.fspath(directory)))
  return (directory / _PARAMS).exists() and (directory / _MODEL_JSON).exists()


def load_params(directory: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
  """Reads a converted checkpoint.

  Returns:
    `(params, model_kwargs)`: params as a pytree of NumPy arrays (dtypes as
    saved), model_kwargs with JSON lists turned back into tuples.
  """
  directory = epath.Path(os.path.abspath(os.fspath(directory)))
  if not is_converted_checkpoint(directory):
    raise FileNotFoundError(
        f"{directory} is not a converted checkpoint (expected {_PARAMS}/ and {_MODEL_JSON}); "
        "make one with: python main.py convert --pth=FILE.pth --output_dir=DIR --variant=tiny")
  model_kwargs = _from_json(json.loads((directory / _MODEL_JSON).read_text()))
  checkpointer = ocp.StandardCheckpointer()
  params = checkpointer.restore(directory / _PARAMS)
  return jax.tree.map(np.asarray, params), model_kwargs
