"""The batch contract between the input pipeline and the jitted steps, defined once.

A batch is a dict of host NumPy arrays, the per-host piece of a global batch:

    video         uint8 pixels: (B, T, H, W, 3) in training, (B, V, T, H, W, 3) with all V views in eval
    pixel_affine  float32 (B, 5, 3): colour jitter and normalisation (``pixels.normalize``), on the device
    label         int32 (B,)
    mask          bool (B,), eval only: False on rows that pad the last batch

``shardings`` gives each field's sharding (the batch axis over ``'data'``),
``to_device`` assembles the global arrays from every host's piece, and
``view_probabilities`` is the one forward used by eval, predict, visualize
and benchmarks: normalise, run every view, softmax, average over the views.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from vfocal_jax import pixels, sharding

__all__ = ["TRAIN_FIELDS", "EVAL_FIELDS", "FIELD_DTYPES", "shardings", "to_device", "view_probabilities"]

# Field -> number of dimensions.
TRAIN_FIELDS = {"video": 5, "pixel_affine": 3, "label": 1}
EVAL_FIELDS = {"video": 6, "pixel_affine": 3, "label": 1, "mask": 1}
# Field -> dtype: uint8 pixels (normalised on device), pixels.normalize's (B, 5, 3) affine, class ids, padding mask.
FIELD_DTYPES = {"video": jnp.uint8, "pixel_affine": jnp.float32, "label": jnp.int32, "mask": jnp.bool_}


def shardings(mesh: Mesh, fields: Mapping[str, int]) -> dict[str, NamedSharding]:
  """Every field's leading (batch) axis over ``'data'``."""
  return {name: sharding.batch_sharding(mesh, ndim) for name, ndim in fields.items()}


def to_device(local_batch: Mapping[str, np.ndarray], mesh: Mesh, fields: Mapping[str, int]) -> dict[str, jax.Array]:
  """The global batch from this host's piece (an identity ``pixel_affine`` when it has none)."""
  local_batch = pixels.with_pixel_affine(local_batch)
  arrays = {name: np.asarray(local_batch[name]) for name in fields}
  if "mask" in arrays:
    arrays["mask"] = arrays["mask"].astype(bool)
  return sharding.global_batch(arrays, mesh)


def view_probabilities(model: Any, params: Any, video: jax.Array, pixel_affine: jax.Array) -> jax.Array:
  """Class probabilities of each video, the softmax averaged over its views.

  Args:
    video: (B, V, T, H, W, 3) pixels of V views per video (uint8, or any dtype).
    pixel_affine: (B, 5, 3) the normalisation of each video's pixels.

  Returns:
    (B, num_classes) float32. (The released test protocol sums the softmax
    over views; the mean ranks the same and reads as a probability.)
  """
  x = pixels.normalize(video, pixel_affine)
  b, v = x.shape[:2]
  logits = model.apply({"params": params}, x.reshape((b * v,) + x.shape[2:]), train=False)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return probs.reshape(b, v, -1).mean(axis=1)
