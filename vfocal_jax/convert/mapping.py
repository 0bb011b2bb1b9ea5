"""Official PyTorch state dict <-> Flax parameters of `VideoFocalNet`.

The Flax tree mirrors the official module names, so each Flax path has exactly
one torch key (`layers_0/blocks_1/modulation/focal_layers_0/kernel` <->
`layers.0.blocks.1.modulation.focal_layers.0.0.weight`; the trailing `.0` is the
conv inside the official `nn.Sequential(conv, GELU)`). Kernels are transposed,
never reshaped (docs/design.md).
"""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vfocal_jax import artifacts, errors

# Flax kernel (in..., out) -> torch weight, by number of dimensions.
_TO_TORCH = {2: (1, 0), 3: (2, 1, 0), 4: (3, 2, 0, 1), 5: (4, 3, 0, 1, 2)}
_TO_FLAX = {n: tuple(np.argsort(p)) for n, p in _TO_TORCH.items()}
_INDEXED = re.compile(r"^(layers|blocks)_(\d+)$")
_FOCAL = re.compile(r"^(focal_layers(?:_temporal)?)_(\d+)$")


class CheckpointMismatchError(errors.MismatchError):
  """A state dict that does not match the model; lists every missing, unexpected and mis-shaped key."""

  def __init__(self, missing: list[str], unexpected: list[str], shape_mismatch: list[str]):
    self.missing, self.unexpected, self.shape_mismatch = missing, unexpected, shape_mismatch
    lines = ["The checkpoint does not match the model."]
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shape_mismatch)):
      if keys:
        lines.append(f"{len(keys)} {title} key(s):\n  " + "\n  ".join(keys))
    lines.append("Check the variant/num_classes/tubelet_size you build, or pass allow_partial=True "
                 "(main.py convert --allow_partial) to load what matches and get this report back.")
    super().__init__("\n".join(lines))

  def report(self) -> dict[str, list[str]]:
    return {"missing": self.missing, "unexpected": self.unexpected, "shape_mismatch": self.shape_mismatch}


def torch_key(flax_path: tuple[str, ...]) -> str:
  """The official state-dict key of a Flax parameter path."""
  parts = []
  for name in flax_path[:-1]:
    if m := _INDEXED.match(name):
      parts += [m.group(1), m.group(2)]
    elif m := _FOCAL.match(name):
      parts += [m.group(1), m.group(2), "0"]
    else:
      parts.append(name)
  leaf = flax_path[-1]
  parts.append("weight" if leaf in ("kernel", "scale") else leaf)
  return ".".join(parts)


def to_torch_layout(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(x, _TO_TORCH[x.ndim])) if x.ndim >= 2 else np.asarray(x)


def to_flax_layout(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(x, _TO_FLAX[x.ndim])) if x.ndim >= 2 else np.asarray(x)


def _init(model: Any, rng: jax.Array) -> Any:
  """Fresh variables of ``model`` (jitted: one compile instead of one per operation)."""
  return jax.jit(model.init)(rng, jnp.zeros((1, model.num_frames, 32, 32, 3)))


def _check_convertible(model: Any) -> None:
  if model.design != "parallel" or model.temporal_conv != "dense":
    raise errors.ConfigError(f"Only the released design (design='parallel', temporal_conv='dense') has official "
                     f"weights; got design={model.design!r}, temporal_conv={model.temporal_conv!r}.")


def torch_to_flax(state_dict: dict[str, np.ndarray], model: Any, *, allow_partial: bool = False) -> Any:
  """Maps an official state dict onto `model`'s parameters: `{'params': ...}` ready for `model.apply`.

  Every tensor maps to exactly one parameter. Any missing, unexpected or
  mis-shaped key raises one `CheckpointMismatchError` listing them all, unless
  `allow_partial`, which returns `(variables, report)`; parameters not loaded
  then keep a fresh initialisation.
  """
  _check_convertible(model)
  shapes = traverse_util.flatten_dict(artifacts.abstract_params(model, model.num_frames, 32))
  want = {torch_key(path): (path, spec) for path, spec in shapes.items()}
  loaded, shape_mismatch, mismatched_keys = {}, [], set()
  for key, value in state_dict.items():
    if key not in want:
      continue
    path, spec = want[key]
    value = to_flax_layout(np.asarray(value))
    if value.shape != tuple(spec.shape):
      shape_mismatch.append(f"{key}: checkpoint {tuple(np.shape(state_dict[key]))} (torch layout), "
                            f"model {tuple(to_torch_layout(np.zeros(spec.shape, np.int8)).shape)}")
      mismatched_keys.add(key)
      continue
    loaded[path] = value.astype(spec.dtype)
  missing = sorted(key for key, (path, _) in want.items() if path not in loaded and key not in mismatched_keys)
  unexpected = sorted(set(state_dict) - set(want))
  report = {"missing": missing, "unexpected": unexpected, "shape_mismatch": shape_mismatch}
  if not allow_partial:
    if missing or unexpected or shape_mismatch:
      raise CheckpointMismatchError(missing, unexpected, shape_mismatch)
    return {"params": traverse_util.unflatten_dict(loaded)}
  fresh = traverse_util.flatten_dict(_init(model, jax.random.key(0))["params"])
  fresh.update(loaded)
  return {"params": traverse_util.unflatten_dict(fresh)}, report


def flax_to_torch_state_dict(variables: Any, model: Any) -> dict[str, np.ndarray]:
  """The inverse of `torch_to_flax`: official key names and torch layouts, NumPy arrays."""
  _check_convertible(model)
  params = variables["params"] if "params" in variables else variables
  return {torch_key(path): to_torch_layout(np.asarray(value))
          for path, value in traverse_util.flatten_dict(params).items()}


def _is_new_in_video_model(key: str) -> bool:
  return "temporal" in key or key.startswith("head.")


def init_from_imagenet(state_dict_2d: dict[str, np.ndarray], model: Any, rng: jax.Array
                       ) -> tuple[Any, dict[str, list[str]]]:
  """Initialises a Video-FocalNet from an ImageNet FocalNet-SRF state dict.

  Spatial weights are copied; the temporal branch and the head keep the fresh
  initialisation from `rng`; a tubelet stem repeats the 2-D patch kernel over
  time and divides by the tubelet size. Raises `CheckpointMismatchError` if a
  spatial weight is missing or mis-shaped. Returns `(variables, report)` with
  the `copied`, `fresh` and `unused` keys.
  """
  _check_convertible(model)
  fresh = traverse_util.flatten_dict(_init(model, rng)["params"])
  copied, new, missing, mismatch = [], [], [], []
  for path, init_value in fresh.items():
    key = torch_key(path)
    if _is_new_in_video_model(key):
      new.append(key)
      continue
    if key not in state_dict_2d:
      missing.append(key)
      continue
    value = np.asarray(state_dict_2d[key])
    if key == "patch_embed.proj.weight" and model.tubelet_size > 1 and value.ndim == 4:
      value = np.repeat(value[:, :, None], model.tubelet_size, axis=2) / model.tubelet_size
    value = to_flax_layout(value)
    if value.shape != init_value.shape:
      mismatch.append(f"{key}: checkpoint {value.shape} (flax layout), model {init_value.shape}")
      continue
    fresh[path] = jnp.asarray(value, init_value.dtype)
    copied.append(key)
  if missing or mismatch:
    raise CheckpointMismatchError(missing, [], mismatch)
  used = set(copied)
  unused = sorted(k for k in state_dict_2d if k not in used)
  return {"params": traverse_util.unflatten_dict(fresh)}, {"copied": copied, "fresh": new, "unused": unused}
