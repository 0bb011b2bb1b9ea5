"""Weights between the released PyTorch Video-FocalNets and this Flax model.

    state_dict = load_torch_checkpoint("video-focalnet_tiny.pth")  # no torch, no code run
    variables = torch_to_flax(state_dict, model)                     # every key, or an error
    flax_to_torch(variables, model, "model.safetensors")             # official key names

`init_from_imagenet` initialises a Video-FocalNet from an ImageNet
FocalNet-SRF state dict. Names resolve lazily, so `torch_pickle` is usable on
its own without importing JAX.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_torch_checkpoint": "vfocal_jax.convert.torch_pickle",
    "read_torch_file": "vfocal_jax.convert.torch_pickle",
    "CheckpointLoadError": "vfocal_jax.convert.torch_pickle",
    "CheckpointFormatError": "vfocal_jax.convert.torch_pickle",
    "CheckpointLimitError": "vfocal_jax.convert.torch_pickle",
    "UnsafeCheckpointError": "vfocal_jax.convert.torch_pickle",
    "torch_to_flax": "vfocal_jax.convert.mapping",
    "flax_to_torch_state_dict": "vfocal_jax.convert.mapping",
    "init_from_imagenet": "vfocal_jax.convert.mapping",
    "CheckpointMismatchError": "vfocal_jax.convert.mapping",
    "flax_to_torch": "vfocal_jax.convert.safetensors_io",
    "load_safetensors": "vfocal_jax.convert.safetensors_io",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return __all__
