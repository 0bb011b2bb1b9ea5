"""Mixup / CutMix: targets sum to 1 and agree with the pixels actually blended."""
import jax
import jax.numpy as jnp
import numpy as np

from vfocal_jax import mixup

B, T, H, W, K = 6, 2, 8, 10, 9


def _constant_videos():
  # Video i is the constant i + 1, so blended pixels reveal the partner and the weight.
  return jnp.broadcast_to(jnp.arange(1, B + 1, dtype=jnp.float32)[:, None, None, None, None], (B, T, H, W, 3))


def test_smooth_one_hot():
  y = np.asarray(mixup.smooth_one_hot(jnp.array([0, 3]), 5, 0.1))
  np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(y[0], [0.92, 0.02, 0.02, 0.02, 0.02], rtol=1e-6)


def _check(video, targets, lam, labels, kind):
  v = np.asarray(video)
  t = np.asarray(targets, np.float64)
  np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-5)
  lam = float(lam.lam[0])
  off, on = 0.1 / K, 0.9 + 0.1 / K
  for i in range(B):
    vals = np.unique(v[i])
    if kind == "mixup":
      # v = lam * (i+1) + (1 - lam) * (j+1): recover j.
      assert len(vals) == 1
      j = int(round((vals[0] - lam * (i + 1)) / (1 - lam))) - 1 if lam < 1 - 1e-6 else i
      frac = lam
    else:
      # Pixels are (i+1) outside the box, (j+1) inside; the box covers 1 - lam of the frame.
      others = [x for x in vals if abs(x - (i + 1)) > 1e-6]
      j = int(round(others[0])) - 1 if others else i
      inside = np.isclose(v[i, ..., 0], j + 1) if j != i else np.zeros((T, H, W), bool)
      assert (inside == inside[0:1]).all(), "the box must be the same in every frame"
      frac = 1.0 - inside[0].mean() if j != i else lam
      np.testing.assert_allclose(frac, lam, atol=1e-6)
    expect = np.full(K, off)
    expect[labels[i]] += frac * (on - off)
    expect[labels[j]] += (1 - frac) * (on - off)
    np.testing.assert_allclose(t[i], expect, atol=2e-5)


def test_mixup_and_cutmix_targets_match_pixels():
  labels = np.array([0, 1, 2, 3, 4, 5])
  seen = set()
  for seed in range(12):
    for kind, kw in (("mixup", dict(cutmix_alpha=0.0)), ("cutmix", dict(mixup_alpha=0.0))):
      video, targets, lam = mixup.mixup_cutmix(jax.random.PRNGKey(seed), _constant_videos(), jnp.asarray(labels),
                                               num_classes=K, label_smoothing=0.1, **kw)
      _check(video, targets, lam, labels, kind)
    # Both on: one of the two, chosen at random.
    video, targets, lam = jax.jit(lambda r: mixup.mixup_cutmix(r, _constant_videos(), jnp.asarray(labels),
                                                              num_classes=K))(jax.random.PRNGKey(100 + seed))
    np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, rtol=1e-5)
    seen.add("mixup" if len(np.unique(np.asarray(video)[0])) == 1 else "cutmix")
  assert seen == {"mixup", "cutmix"}


def test_off_gives_smoothed_labels():
  video, targets, lam = mixup.mixup_cutmix(jax.random.PRNGKey(0), _constant_videos(), jnp.arange(B), num_classes=K,
                                           mixup_alpha=0.0, cutmix_alpha=0.0)
  np.testing.assert_array_equal(np.asarray(video), np.asarray(_constant_videos()))
  np.testing.assert_allclose(np.asarray(targets), np.asarray(mixup.smooth_one_hot(jnp.arange(B), K, 0.1)))
