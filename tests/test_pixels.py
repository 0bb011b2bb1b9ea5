"""Device-side normalisation of the pipeline's uint8 clips against NumPy float64."""
import jax
import numpy as np
import pytest

from vfocal_jax import pixels


@pytest.mark.parametrize("shape", [(3, 2, 4, 5, 3), (2, 6, 2, 4, 4, 3)])   # train (B,T,H,W,3), eval (B,V,...)
def test_normalize_applies_each_clips_affine(shape):
  rng = np.random.default_rng(0)
  video = rng.integers(0, 256, shape, dtype=np.uint8)
  affine = rng.normal(size=(shape[0], 4, 3)).astype(np.float32)
  got = np.asarray(jax.jit(pixels.normalize)(video, affine))
  x = np.concatenate([video.astype(np.float64), np.ones(shape[:-1] + (1,))], axis=-1)
  want = np.stack([x[b] @ affine[b].astype(np.float64) for b in range(shape[0])])
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_identity_affine_keeps_normalised_video():
  video = np.random.default_rng(1).normal(size=(2, 3, 4, 4, 3)).astype(np.float32)
  batch = pixels.with_pixel_affine({"video": video, "label": np.zeros(2, np.int32)})
  assert batch["pixel_affine"].shape == (2, 4, 3)
  np.testing.assert_array_equal(np.asarray(pixels.normalize(batch["video"], batch["pixel_affine"])), video)
  given = np.ones((2, 4, 3), np.float32)
  assert pixels.with_pixel_affine({"video": video, "pixel_affine": given})["pixel_affine"] is given
