"""Model input from the pipeline's uint8 pixels, on the device.

The input pipeline hands out uint8 clips and, per clip, a `pixel_affine`
(5, 3): colour jitter and normalisation folded into one map of RGB that also
takes the clip's mean luma m (the contrast step blends towards it):
`[r, g, b, 1, m] @ pixel_affine`. Applying it here, inside the jitted step,
keeps full-size float work off the host and sends a quarter of the bytes.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vfocal_jax.colour import LUMA  # The pipeline's colour augmentation uses the same weights.


def normalize(video: jax.Array, pixel_affine: jax.Array, dtype=jnp.float32) -> jax.Array:
  """`[x, 1, m_b] @ pixel_affine[b]` for every pixel x of clip b, m_b its mean luma.

  Args:
    video: (B, ..., 3) pixels, any dtype (uint8 from the pipeline); m_b is
      the mean luma over all of row b (a clip, or all views of a video).
    pixel_affine: (B, 5, 3): rows 0-2 the matrix, row 3 the offset, row 4
      the coefficients of the mean luma.
  Returns:
    (B, ..., 3) in `dtype`: one reduction and one fused element-wise pass.
  """
  x = video.astype(dtype)
  b = video.shape[0]
  a = pixel_affine.astype(dtype).reshape((b,) + (1,) * (video.ndim - 2) + (5, 3))
  luma = x[..., 0] * LUMA[0] + x[..., 1] * LUMA[1] + x[..., 2] * LUMA[2]
  m = luma.reshape(b, -1).mean(axis=1).reshape((b,) + (1,) * (video.ndim - 1))
  return (x[..., 0:1] * a[..., 0, :] + x[..., 1:2] * a[..., 1, :] + x[..., 2:3] * a[..., 2, :]
          + a[..., 3, :] + m * a[..., 4, :])


def with_pixel_affine(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Host-side: `batch` with an identity `pixel_affine` when it has none (its video is already normalised).

  For batches from other sources than the input pipeline (custom iterators,
  tests): the jitted steps always read `video` and `pixel_affine`.
  """
  batch = dict(batch)
  if "pixel_affine" not in batch:
    identity = np.concatenate([np.eye(3), np.zeros((2, 3))]).astype(np.float32)
    batch["pixel_affine"] = np.broadcast_to(identity, (len(batch["video"]), 5, 3))
  return batch
