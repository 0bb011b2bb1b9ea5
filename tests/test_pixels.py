"""Device-side normalisation of the pipeline's uint8 clips against NumPy float64."""
import jax
import numpy as np
import pytest

from vfocal_jax import pixels


@pytest.mark.parametrize("shape", [(3, 2, 4, 5, 3), (2, 6, 2, 4, 4, 3)])   # train (B,T,H,W,3), eval (B,V,...)
def test_normalize_applies_each_clips_affine(shape):
  rng = np.random.default_rng(0)
  video = rng.integers(0, 256, shape, dtype=np.uint8)
  affine = rng.normal(size=(shape[0], 5, 3)).astype(np.float32)
  got = np.asarray(jax.jit(pixels.normalize)(video, affine))
  want = []
  for clip, a in zip(video.astype(np.float64), affine.astype(np.float64)):
    mean_luma = (0.299 * clip[..., 0] + 0.587 * clip[..., 1] + 0.114 * clip[..., 2]).mean()
    x = np.concatenate([clip, np.ones(clip.shape[:-1] + (1,)), np.full(clip.shape[:-1] + (1,), mean_luma)], -1)
    want.append(x @ a)
  want = np.stack(want)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_identity_affine_keeps_normalised_video():
  video = np.random.default_rng(1).normal(size=(2, 3, 4, 4, 3)).astype(np.float32)
  batch = pixels.with_pixel_affine({"video": video, "label": np.zeros(2, np.int32)})
  assert batch["pixel_affine"].shape == (2, 5, 3)
  np.testing.assert_array_equal(np.asarray(pixels.normalize(batch["video"], batch["pixel_affine"])), video)
  given = np.ones((2, 5, 3), np.float32)
  assert pixels.with_pixel_affine({"video": video, "pixel_affine": given})["pixel_affine"] is given

