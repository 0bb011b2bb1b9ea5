"""Mixup / CutMix with label smoothing, on the device, inside the jitted step, within each data shard.

Follows the released recipe's ``CutmixMixupBlending`` (from X-CLIP): labels are
one-hot with smoothing ``eps`` (off value ``eps / K``, on value
``1 - eps + eps / K``); each batch is blended with a random permutation of
itself, by mixup (``lam ~ Beta(0.8, 0.8)``) or, with probability
``switch_prob``, by CutMix (``lam ~ Beta(1, 1)``, one box shared by every frame
of every clip, ``lam`` corrected to the box's true area). The same box covers
all frames, so the motion inside it stays one video's motion.

The released code blends each GPU's own batch (``torch.randperm`` on every DDP
worker). ``mix_per_shard`` does the same per data shard of the mesh: each shard
draws its permutation, mixup/CutMix choice, ``lam`` and box from the step's key
folded with its shard index and pairs only the clips it holds, so no collective
moves the video (indexing the global batch with one permutation made XLA
all-gather the whole batch onto every chip).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P


class MixInfo(NamedTuple):
  """The blending actually applied to a batch of B clips held in S data shards (B/S rows each, in order).

  Output row ``i`` (in shard ``s = i // (B/S)``) is, with ``j = perm[i]``
  (always a row of the same shard):

  * mixup (``cutmix[s]`` False): ``lam[s] * x[i] + (1 - lam[s]) * x[j]``;
  * CutMix (``cutmix[s]`` True): ``x[j]`` where ``box_mask[s]`` is True (the
    same (H, W) box in every frame), ``x[i]`` elsewhere; ``lam[s]`` is then
    ``1 - box area / (H * W)``;

  and its target is ``lam[s] * y[i] + (1 - lam[s]) * y[j]``, ``y`` the
  label-smoothed one-hot targets. With mixing off: ``lam`` ones, ``perm`` the
  identity, ``cutmix`` and ``box_mask`` all False.

  Attributes:
    lam: (S,) float32, the weight of the clip's own content.
    perm: (B,) int32, global row indices of the partners.
    cutmix: (S,) bool, CutMix (True) or mixup (False) in each shard.
    box_mask: (S, H, W) bool, the CutMix box (all False in a mixup shard).
  """
  lam: jax.Array
  perm: jax.Array
  cutmix: jax.Array
  box_mask: jax.Array


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
                 switch_prob: float = 0.5) -> tuple[jax.Array, jax.Array, MixInfo]:
  """Blends a batch with a permutation of itself (one shard): ``(video, soft_targets, MixInfo)``.

  Args:
    rng: PRNG key (fold in the step so every step draws afresh).
    video: (B, T, H, W, C), blended in its own dtype (the weights in float32).
    labels: (B,) int class indices.
    num_classes: K.
    label_smoothing: eps of the one-hot targets.
    mixup_alpha: Beta parameter of mixup; 0 turns mixup off.
    cutmix_alpha: Beta parameter of CutMix; 0 turns CutMix off.
    switch_prob: probability of CutMix when both are on.

  Returns:
    The blended video (same dtype), targets (B, K) float32 summing to 1, and
    the ``MixInfo`` of this one shard (S = 1).
  """
  batch, height, width = video.shape[0], video.shape[-3], video.shape[-2]
  targets = smooth_one_hot(labels, num_classes, label_smoothing)
  no_box = jnp.zeros((height, width), bool)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    info = MixInfo(jnp.ones((), jnp.float32), jnp.arange(batch, dtype=jnp.int32), jnp.zeros((), bool), no_box)
    return video, targets, _add_shard_axis(info)
  r_perm, r_switch, r_mix, r_cut, r_box = jax.random.split(rng, 5)
  perm = jax.random.permutation(r_perm, batch).astype(jnp.int32)
  other = video[perm]

  # The weights and the box are drawn whichever branch runs (cheap); only the video op is chosen.
  lam_mix = jax.random.beta(r_mix, mixup_alpha, mixup_alpha).astype(jnp.float32) if mixup_alpha > 0 else None
  if cutmix_alpha > 0:
    lam_cut = jax.random.beta(r_cut, cutmix_alpha, cutmix_alpha).astype(jnp.float32)
    box, lam_cut = cutmix_box(r_box, height, width, lam_cut)

  def do_mixup(_):
    mixed = lam_mix * video.astype(jnp.float32) + (1.0 - lam_mix) * other.astype(jnp.float32)
    return mixed.astype(video.dtype)

  def do_cutmix(_):
    return jnp.where(box[:, :, None], other, video)

  if mixup_alpha <= 0:
    use_cutmix, mixed, lam = jnp.ones((), bool), do_cutmix(None), lam_cut
  elif cutmix_alpha <= 0:
    use_cutmix, mixed, lam, box = jnp.zeros((), bool), do_mixup(None), lam_mix, no_box
  else:
    use_cutmix = jax.random.uniform(r_switch) < switch_prob
    mixed = jax.lax.cond(use_cutmix, do_cutmix, do_mixup, None)
    lam, box = jnp.where(use_cutmix, lam_cut, lam_mix), box & use_cutmix
  targets = lam * targets + (1.0 - lam) * targets[perm]
  return mixed, targets, _add_shard_axis(MixInfo(lam, perm, use_cutmix, box))


def _add_shard_axis(info: MixInfo) -> MixInfo:
  return MixInfo(info.lam[None], info.perm, info.cutmix[None], info.box_mask[None])


def batch_axes(batch_spec: Sequence | P | None) -> tuple[str, ...]:
  """The mesh axes the batch's leading axis is split over, from the spec of its leading axes."""
  if batch_spec is None or len(batch_spec) == 0 or batch_spec[0] is None:
    return ()
  first = batch_spec[0]
  return tuple(first) if isinstance(first, (tuple, list)) else (first,)


def mix_per_shard(rng: jax.Array, video: jax.Array, labels: jax.Array, *, num_classes: int,
                  mesh: Mesh | None = None, batch_spec: Sequence | P | None = None, dtype=None,
                  label_smoothing: float = 0.1, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                  switch_prob: float = 0.5) -> tuple[jax.Array, jax.Array, MixInfo]:
  """``mixup_cutmix`` inside every data shard of ``mesh``: ``(video, soft_targets, MixInfo)``.

  Shard ``s`` (the linear index over the batch's mesh axes, ``batch_spec[0]``)
  blends only its own rows with the key ``fold_in(rng, s)``; the video, the
  targets and ``MixInfo.perm`` come back sharded like the batch. With
  ``mesh`` None (or no batch axes) the whole batch is shard 0, which a
  one-device mesh also gives. The video is cast to ``dtype`` (the model's
  compute dtype) before it is blended.
  """
  if dtype is not None:
    video = video.astype(dtype)
  kw = dict(num_classes=num_classes, label_smoothing=label_smoothing, mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha, switch_prob=switch_prob)
  axes = batch_axes(batch_spec)
  if mesh is None or not axes:
    return mixup_cutmix(jax.random.fold_in(rng, 0), video, labels, **kw)

  def one_shard(rng, video, labels):
    shard = jax.lax.axis_index(axes)
    mixed, targets, info = mixup_cutmix(jax.random.fold_in(rng, shard), video, labels, **kw)
    return mixed, targets, info._replace(perm=info.perm + shard * video.shape[0])

  rows = P(axes)
  return jax.shard_map(one_shard, mesh=mesh, in_specs=(P(), rows, rows),
                       out_specs=(rows, rows, MixInfo(rows, rows, rows, rows)))(rng, video, labels)
