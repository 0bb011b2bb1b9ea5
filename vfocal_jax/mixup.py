"""Mixup / CutMix with label smoothing, on the device, inside the jitted step.

Follows the released recipe's ``CutmixMixupBlending`` (from X-CLIP): labels are
one-hot with smoothing ``eps`` (off value ``eps / K``, on value
``1 - eps + eps / K``); each batch is blended with a random permutation of
itself, by mixup (``lam ~ Beta(0.8, 0.8)``) or, with probability
``switch_prob``, by CutMix (``lam ~ Beta(1, 1)``, one box shared by every frame
of every clip, ``lam`` corrected to the box's true area). The same box covers
all frames, so the motion inside it stays one video's motion.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """One-hot targets with label smoothing, as timm's ``one_hot(on, off)``."""
  off = smoothing / num_classes
  on = 1.0 - smoothing + off
  return jax.nn.one_hot(labels, num_classes) * (on - off) + off


def cutmix_box(rng: jax.Array, height: int, width: int, lam: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A random box of area about ``(1 - lam) * H * W`` (centre uniform, clipped).

  Returns:
    ``(mask, lam_adjusted)``: a (H, W) bool mask, True inside the box, and
    ``1 - box_area / (H * W)``.
  """
  cut_rat = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * cut_rat).astype(jnp.int32)
  cut_w = jnp.floor(width * cut_rat).astype(jnp.int32)
  ry, rx = jax.random.split(rng)
  cy = jax.random.randint(ry, (), 0, height)
  cx = jax.random.randint(rx, (), 0, width)
  y1, y2 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x1, x2 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  ys, xs = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  mask = (ys >= y1) & (ys < y2) & (xs >= x1) & (xs < x2)
  lam_adj = 1.0 - ((y2 - y1) * (x2 - x1)).astype(jnp.float32) / (height * width)
  return mask, lam_adj


def mixup_cutmix(rng: jax.Array, video: jax.Array, labels: jax.Array, *, num_classes: int,
                 label_smoothing: float = 0.1, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Blends a batch with a permutation of itself; returns ``(video, soft_targets, lam)``.

  Args:
    rng: PRNG key (fold in the step so every step draws afresh).
    video: (B, T, H, W, C).
    labels: (B,) int class indices.
    num_classes: K.
    label_smoothing: eps of the one-hot targets.
    mixup_alpha: Beta parameter of mixup; 0 turns mixup off.
    cutmix_alpha: Beta parameter of CutMix; 0 turns CutMix off.
    switch_prob: probability of CutMix when both are on.

  Returns:
    The blended video (same dtype), targets (B, K) float32 summing to 1, and the
    mixing weight actually used.
  """
  targets = smooth_one_hot(labels, num_classes, label_smoothing)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return video, targets, jnp.ones((), jnp.float32)
  r_perm, r_switch, r_mix, r_cut, r_box = jax.random.split(rng, 5)
  perm = jax.random.permutation(r_perm, video.shape[0])
  other = video[perm]
  height, width = video.shape[-3], video.shape[-2]

  def do_mixup(_):
    lam = jax.random.beta(r_mix, mixup_alpha, mixup_alpha).astype(jnp.float32)
    mixed = lam * video.astype(jnp.float32) + (1.0 - lam) * other.astype(jnp.float32)
    return mixed.astype(video.dtype), lam

  def do_cutmix(_):
    lam = jax.random.beta(r_cut, cutmix_alpha, cutmix_alpha).astype(jnp.float32)
    mask, lam_adj = cutmix_box(r_box, height, width, lam)
    return jnp.where(mask[:, :, None], other, video), lam_adj

  if mixup_alpha <= 0:
    mixed, lam = do_cutmix(None)
  elif cutmix_alpha <= 0:
    mixed, lam = do_mixup(None)
  else:
    use_cutmix = jax.random.uniform(r_switch) < switch_prob
    mixed, lam = jax.lax.cond(use_cutmix, do_cutmix, do_mixup, None)
  targets = lam * targets + (1.0 - lam) * targets[perm]
  return mixed, targets, lam
