"""Flax variables -> a safetensors file with the official PyTorch key names.

`torch.nn.Module.load_state_dict(safetensors.torch.load_file(path))` then
loads it into the official Video-FocalNet, so models trained here go back to
PyTorch. Arrays are written bit for bit in their own dtype.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import safetensors.numpy

from vfocal_jax.convert import mapping

__all__ = ["flax_to_torch", "load_safetensors"]


def flax_to_torch(variables: Any, model: Any, path: str | os.PathLike,
                  metadata: dict[str, str] | None = None) -> dict[str, np.ndarray]:
  """Writes `variables` (`{'params': ...}` or the params themselves) as safetensors.

  Args:
    variables: the model's variables or params.
    model: the `VideoFocalNet` they belong to (gives the key layout).
    path: the `.safetensors` file to write.
    metadata: optional string metadata stored in the file header.

  Returns:
    The state dict written, `{official key: array}`.
  """
  if not (isinstance(variables, dict) and "params" in variables):
    variables = {"params": variables}
  state_dict = mapping.flax_to_torch_state_dict(variables, model)
  tensors = {k: np.ascontiguousarray(np.asarray(v)) for k, v in state_dict.items()}
  os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
  safetensors.numpy.save_file(tensors, os.fspath(path), metadata=metadata)
  return tensors


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a safetensors file as `{key: array}` (e.g. to convert it back with torch_to_flax)."""
  return dict(safetensors.numpy.load_file(os.fspath(path)))
