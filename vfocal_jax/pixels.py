"""Model input from the pipeline's uint8 pixels, on the device.

The input pipeline hands out uint8 clips and, per clip, a `pixel_affine`
(4, 3): colour jitter and normalisation folded into one affine map of RGB,
`[r, g, b, 1] @ pixel_affine`. Applying it here, inside the jitted step,
keeps full-size float work off the host and sends a quarter of the bytes.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np


def normalize(video: jax.Array, pixel_affine: jax.Array, dtype=jnp.float32) -> jax.Array:
  """`[x, 1] @ pixel_affine[b]` for every pixel of clip b.

  Args:
    video: (B, ..., 3) pixels, any dtype (uint8 from the pipeline).
    pixel_affine: (B, 4, 3): rows 0-2 the matrix, row 3 the offset.
  Returns:
    (B, ..., 3) in `dtype`. Written as three multiply-adds so that XLA fuses
    it into one element-wise pass.
  """
  a = pixel_affine.astype(dtype).reshape((pixel_affine.shape[0],) + (1,) * (video.ndim - 2) + (4, 3))
  x = video.astype(dtype)
  return x[..., 0:1] * a[..., 0, :] + x[..., 1:2] * a[..., 1, :] + x[..., 2:3] * a[..., 2, :] + a[..., 3, :]


def with_pixel_affine(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Host-side: `batch` with an identity `pixel_affine` when it has none (its video is already normalised).

  For batches from other sources than the input pipeline (custom iterators,
  tests): the jitted steps always read `video` and `pixel_affine`.
  """
  batch = dict(batch)
  if "pixel_affine" not in batch:
    identity = np.concatenate([np.eye(3), np.zeros((1, 3))]).astype(np.float32)
    batch["pixel_affine"] = np.broadcast_to(identity, (len(batch["video"]), 4, 3))
  return batch
