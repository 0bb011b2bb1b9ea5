"""Mixup / CutMix: targets agree with the pixels actually blended, pairs stay in their data shard, lam's law.

Clip i is the constant i + 1, so a blended pixel reveals the partner and the weight independently of the
code's own ``MixInfo``, which is then checked against what the pixels show.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from scipy import stats

from vfocal_jax import mixup, sharding

T, H, W, K = 2, 8, 10, 9
EPS = 0.1


def _constant_videos(b):
  return jnp.broadcast_to(jnp.arange(1, b + 1, dtype=jnp.float32)[:, None, None, None, None], (b, T, H, W, 3))


def test_smooth_one_hot():
  y = np.asarray(mixup.smooth_one_hot(jnp.array([0, 3]), 5, 0.1))
  np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(y[0], [0.92, 0.02, 0.02, 0.02, 0.02], rtol=1e-6)


def _check(video, targets, info, labels, num_shards):
  """Recovers each row's partner and weight from the pixels alone; checks them against ``info`` and the targets.

  Returns the number of rows whose recovered partner is another clip (so callers can require some).
  """
  v, t = np.asarray(video, np.float64), np.asarray(targets, np.float64)
  lam, perm = np.asarray(info.lam, np.float64), np.asarray(info.perm)
  cutmix, boxes = np.asarray(info.cutmix), np.asarray(info.box_mask)
  b = len(v)
  rows = b // num_shards
  assert lam.shape == cutmix.shape == (num_shards,) and boxes.shape == (num_shards, H, W) and perm.shape == (b,)
  np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-5)
  off, on = EPS / K, 1 - EPS + EPS / K
  moved = 0
  for i in range(b):
    s = i // rows
    if cutmix[s]:
      # (i+1) outside the box, (j+1) inside; the box is the same in every frame; lam = 1 - its area.
      others = np.unique(v[i][~np.isclose(v[i], i + 1)])
      assert len(others) <= 1
      j = int(round(others[0])) - 1 if len(others) else i
      inside = np.isclose(v[i, ..., 0], j + 1) if j != i else np.zeros((T, H, W), bool)
      assert (inside == inside[0:1]).all(), "the box must be the same in every frame"
      if j != i:
        np.testing.assert_array_equal(inside[0], boxes[s])
      np.testing.assert_allclose(lam[s], 1.0 - boxes[s].mean(), atol=1e-6)
      frac = 1.0 - inside[0].mean()
      if j == i and perm[i] != i:  # A partner that moved must show, unless the box is empty.
        assert not boxes[s].any()
    else:
      assert not boxes[s].any()
      vals = np.unique(v[i])
      assert len(vals) == 1
      # v = lam (i+1) + (1 - lam)(j+1): a clip blended with itself shows i+1; with another, j from the value.
      j = i if np.isclose(vals[0], i + 1, atol=1e-5) else int(round((vals[0] - lam[s] * (i + 1)) / (1 - lam[s]))) - 1
      if j != i:
        np.testing.assert_allclose(vals[0], lam[s] * (i + 1) + (1 - lam[s]) * (j + 1), rtol=1e-5)
      frac = lam[s] if j != i else 1.0
      if perm[i] != i:  # lam == 1 exactly would hide the partner: Beta(0.8, 0.8) never gives it in float32.
        assert lam[s] < 1 and j != i
    if j != i:
      assert j // rows == s, f"row {i} (shard {s}) was blended with row {j} of shard {j // rows}"
      assert perm[i] == j, f"row {i}: the pixels show partner {j}, MixInfo says {perm[i]}"
      moved += 1
    # Targets from the recovered partner and weight, not from the code's own.
    expect = np.full(K, off)
    expect[labels[i]] += frac * (on - off)
    expect[labels[j]] += (1 - frac) * (on - off)
    np.testing.assert_allclose(t[i], expect, atol=2e-5)
  return moved


def test_one_shard_targets_match_pixels():
  b, labels = 6, np.array([0, 1, 2, 3, 4, 5])
  moved = {"mixup": 0, "cutmix": 0}
  for seed in range(12):
    for kind, kw in (("mixup", dict(cutmix_alpha=0.0)), ("cutmix", dict(mixup_alpha=0.0))):
      video, targets, info = mixup.mixup_cutmix(jax.random.PRNGKey(seed), _constant_videos(b), jnp.asarray(labels),
                                                num_classes=K, label_smoothing=EPS, **kw)
      assert bool(info.cutmix[0]) == (kind == "cutmix")
      moved[kind] += _check(video, targets, info, labels, 1)
  assert moved["mixup"] > 20 and moved["cutmix"] > 10


@pytest.fixture(scope="module")
def mesh():
  return sharding.create_mesh((4, 2))


@pytest.mark.parametrize("batch_spec,num_shards", [((sharding.DATA,), 4), (((sharding.DATA, sharding.MODEL),), 8)])
def test_pairs_stay_in_their_data_shard(mesh, batch_spec, num_shards):
  """8 CPU devices: each output clip blends clips of its own shard only, and no collective moves the video."""
  b = 4 * num_shards
  labels = np.arange(b) % K
  rows = NamedSharding(mesh, P(batch_spec[0]))
  video, y = jax.device_put(_constant_videos(b), rows), jax.device_put(jnp.asarray(labels), rows)
  mix = jax.jit(lambda r, v, y: mixup.mix_per_shard(r, v, y, num_classes=K, mesh=mesh, batch_spec=batch_spec,
                                                    label_smoothing=EPS))
  hlo = mix.lower(jax.random.PRNGKey(0), video, y).compile().as_text()
  for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
    assert op not in hlo, op
  moved, kinds = 0, set()
  for seed in range(6):
    out_video, targets, info = mix(jax.random.PRNGKey(seed), video, y)
    assert out_video.sharding.spec[0] == batch_spec[0] and out_video.dtype == jnp.float32
    moved += _check(out_video, targets, info, labels, num_shards)
    kinds |= set(np.asarray(info.cutmix).tolist())
    # The shards draw independently (their own keys).
    assert len(set(np.asarray(info.lam).tolist())) > 1
  assert moved > 2 * b and kinds == {True, False}


def test_blends_in_the_compute_dtype(mesh):
  video = jax.device_put(_constant_videos(8), NamedSharding(mesh, P(sharding.DATA)))
  out, targets, _ = mixup.mix_per_shard(jax.random.PRNGKey(0), video, jnp.arange(8), num_classes=K, mesh=mesh,
                                        batch_spec=(sharding.DATA,), dtype=jnp.bfloat16)
  assert out.dtype == jnp.bfloat16 and targets.dtype == jnp.float32


def test_one_device_mesh_is_the_unsharded_draw():
  """A one-device mesh, or none, draws exactly as shard 0: one device keeps the released statistics."""
  one = sharding.create_mesh((1, 1), jax.devices()[:1])
  args = (jax.random.PRNGKey(3), _constant_videos(6), jnp.arange(6))
  a = mixup.mix_per_shard(*args, num_classes=K, mesh=one, batch_spec=(sharding.DATA,))
  b = mixup.mix_per_shard(*args, num_classes=K)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _draws(n, **kw):
  keys = jax.random.split(jax.random.PRNGKey(7), n)
  one = lambda r: mixup.mixup_cutmix(r, jnp.zeros((2, 1, H, W, 1)), jnp.arange(2), num_classes=K, **kw)[2]
  return jax.tree.map(np.asarray, jax.jit(jax.vmap(one))(keys))


def _timm_cutmix_lams(n, lam_alpha, rng):
  """timm's ``rand_bbox`` + area correction, in NumPy: the independent law of CutMix's lam."""
  lam = rng.beta(lam_alpha, lam_alpha, n)
  cut = np.sqrt(1 - lam)
  ch, cw = (H * cut).astype(int), (W * cut).astype(int)
  cy, cx = rng.integers(0, H, n), rng.integers(0, W, n)
  y1, y2 = np.clip(cy - ch // 2, 0, H), np.clip(cy + ch // 2, 0, H)
  x1, x2 = np.clip(cx - cw // 2, 0, W), np.clip(cx + cw // 2, 0, W)
  return 1 - (y2 - y1) * (x2 - x1) / (H * W)


def test_lam_distribution():
  n = 4000
  mix = _draws(n, cutmix_alpha=0.0)
  lam = mix.lam[:, 0]
  # Beta(0.8, 0.8): Kolmogorov-Smirnov against scipy's law (p > 1e-3), and its mean and variance.
  assert stats.kstest(lam, stats.beta(0.8, 0.8).cdf).pvalue > 1e-3
  assert abs(lam.mean() - 0.5) < 0.02 and abs(lam.var() - 0.64 / (2.56 * 2.6)) < 0.01
  cut = _draws(n, mixup_alpha=0.0)
  lam = cut.lam[:, 0]
  np.testing.assert_allclose(lam, 1 - cut.box_mask[:, 0].mean(axis=(1, 2)), atol=1e-6)  # lam is the box's area
  ref = _timm_cutmix_lams(200_000, 1.0, np.random.default_rng(0))
  # A discrete law (box sizes): compare the float32 values and the float64 ones on the same grid.
  assert stats.ks_2samp(np.round(lam.astype(np.float64), 5), np.round(ref, 5)).pvalue > 1e-3
  both = _draws(n)
  frac = both.cutmix[:, 0].mean()
  assert abs(frac - 0.5) < 0.04  # switch_prob 0.5 (4000 draws: sd 0.008)


def test_off_gives_smoothed_labels():
  video, targets, info = mixup.mixup_cutmix(jax.random.PRNGKey(0), _constant_videos(6), jnp.arange(6),
                                            num_classes=K, mixup_alpha=0.0, cutmix_alpha=0.0)
  np.testing.assert_array_equal(np.asarray(video), np.asarray(_constant_videos(6)))
  np.testing.assert_allclose(np.asarray(targets), np.asarray(mixup.smooth_one_hot(jnp.arange(6), K, 0.1)))
  np.testing.assert_array_equal(np.asarray(info.perm), np.arange(6))
  assert float(info.lam[0]) == 1.0 and not bool(info.cutmix[0]) and not np.asarray(info.box_mask).any()
