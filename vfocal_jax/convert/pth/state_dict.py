"""From an unpickled checkpoint to `{key: array}`: find the state dict, check and clean its keys."""
from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from vfocal_jax.convert.pth.errors import CheckpointFormatError, clip
from vfocal_jax.convert.pth.values import NumpyArray, PendingTensor, describe

PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile
WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "module")


def _is_array(value: Any) -> bool:
  return isinstance(value, (np.ndarray, PendingTensor, NumpyArray))


def find_state_dict(obj: Any) -> Mapping:
  """The mapping that holds the model's tensors (before or after they are materialised)."""
  sd = obj
  if isinstance(obj, Mapping):
    for key in WRAPPER_KEYS:
      if isinstance(obj.get(key), Mapping):
        sd = obj[key]
        break
  if not isinstance(sd, Mapping) or not any(_is_array(v) for v in sd.values()):
    top = ([describe(k) for k in itertools.islice(obj, 10)] if isinstance(obj, Mapping)
           else describe(obj))
    raise CheckpointFormatError(f"no state dict found (top level: {clip(str(top), 400)}); "
                                "expected a dict of tensors or a dict with a 'model' entry")
  return sd


def clean_state_dict(sd: Mapping, source: str) -> dict[str, np.ndarray]:
  """String keys only, prefixes stripped (two keys may not become one), non-tensors skipped."""
  out: dict[str, np.ndarray] = {}
  origin: dict[str, str] = {}
  skipped = []
  for key, value in sd.items():
    if type(key) is not str:
      raise CheckpointFormatError(f"state-dict key {describe(key)} is not a string", source)
    if not isinstance(value, np.ndarray):
      skipped.append(key)
      continue
    name = key
    while name.startswith(PREFIXES):
      name = name[len(next(p for p in PREFIXES if name.startswith(p))):]
    if name in out:
      raise CheckpointFormatError(
          f"state-dict keys {describe(origin[name])} and {describe(key)} both name "
          f"{describe(name)} once the prefixes {list(PREFIXES)} are stripped", source)
    out[name] = value
    origin[name] = key
  if skipped:
    logging.warning("%s: skipped non-tensor state-dict entries %s", clip(source, 300),
                    [clip(k, 60) for k in skipped[:10]])
  return out
