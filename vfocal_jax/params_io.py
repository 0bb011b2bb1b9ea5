"""The converted-checkpoint format: model parameters plus the model card.

A converted checkpoint is a directory (local or ``gs://``):

    DIR/params/           Orbax ``StandardCheckpointer`` checkpoint of the params pytree
    DIR/model_card.json   architecture, clip, preprocessing, class names, provenance (``model_card``)

``main.py convert`` writes it; ``artifacts.load`` reads it for eval, predict,
visualize and fine-tuning. It holds no optimizer state and no training
config, so it is also what to publish.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from vfocal_jax import errors, model_card, paths

__all__ = ["save_params", "load_params", "is_converted_checkpoint"]

_PARAMS = "params"


def save_params(directory: paths.PathLike, params: Any, card: model_card.ModelCard) -> str:
  """Writes ``params`` (the ``'params'`` collection) and ``card`` to a new ``directory``; returns its path."""
  directory = paths.resolve(directory)
  if (directory / _PARAMS).exists():
    raise FileExistsError(f"{directory / _PARAMS} already exists: choose a new --output_dir "
                          "or delete the old checkpoint")
  if isinstance(params, dict) and set(params) == {"params"}:
    raise ValueError("save_params takes the 'params' collection, not {'params': ...}")
  directory.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / _PARAMS, params)
    checkpointer.wait_until_finished()
  model_card.write_card(directory, card)
  return str(directory)


def is_converted_checkpoint(directory: paths.PathLike) -> bool:
  """Whether ``directory`` holds a ``params/`` checkpoint."""
  return (paths.resolve(directory) / _PARAMS).exists()


def load_params(directory: paths.PathLike) -> Any:
  """The parameters of a converted checkpoint as NumPy arrays (dtypes as saved)."""
  directory = paths.resolve(directory)
  if not is_converted_checkpoint(directory):
    raise errors.MissingFileError(
        directory, f"not a converted checkpoint (no {_PARAMS}/); make one with: "
        "python main.py convert --pth=FILE.pth --output_dir=DIR")
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(directory / _PARAMS)
  return jax.tree.map(np.asarray, params)
