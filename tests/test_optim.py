"""LR schedule against timm's formula (float64) and the optimizers against torch.optim.SGD and torch.optim.AdamW."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from vfocal_jax import optim


def timm_cosine_lr(t, *, base, warmup_lr, min_lr, warmup_t, t_initial):
  """timm CosineLRScheduler._get_lr (cycle_limit=1, warmup_prefix=False), float64."""
  if t < warmup_t:
    return warmup_lr + t * (base - warmup_lr) / warmup_t
  if t >= t_initial:
    return min_lr
  return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / t_initial))


def _config(**kw):
  c = ml_collections.ConfigDict(dict(
      base_lr=0.1, warmup_lr=1e-3, min_lr=1e-3, batch_size=32, accumulation_steps=2,
      num_epochs=120, warmup_epochs=20, num_train_steps=-1, warmup_steps=-1, lr_scaling=True,
      optimizer="sgd", momentum=0.9, nesterov=True, grad_clip_norm=5.0, weight_decay=1e-4,
      weight_decay_quirk=True, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8))
  c.update(kw)
  return c


def test_schedule_matches_official_formula():
  steps_per_epoch = 7
  cfg = _config()
  sched = optim.create_learning_rate_schedule(cfg, steps_per_epoch)
  scale = 32 * 2 / 512  # global batch x accumulation / 512
  kw = dict(base=0.1 * scale, warmup_lr=1e-3 * scale, min_lr=1e-3 * scale,
            warmup_t=20 * steps_per_epoch, t_initial=120 * steps_per_epoch)
  total = 120 * steps_per_epoch
  for t in [0, 1, kw["warmup_t"] - 1, kw["warmup_t"], kw["warmup_t"] + 1, total // 2, total - 1, total, total + 5]:
    np.testing.assert_allclose(float(sched(t)), timm_cosine_lr(t, **kw), rtol=2e-6, atol=1e-9)
  # Named points: warm-up start, warm-up end (unshifted cosine), end.
  np.testing.assert_allclose(float(sched(0)), 1e-3 * scale, rtol=1e-6)
  np.testing.assert_allclose(float(sched(kw["warmup_t"])),
                             1e-3 * scale + 0.5 * (0.1 - 1e-3) * scale * (1 + math.cos(math.pi / 6)), rtol=1e-6)
  np.testing.assert_allclose(float(sched(total)), 1e-3 * scale, rtol=1e-6)


def test_sgd_matches_torch():
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(5, 3)).astype(np.float32)
  b0 = rng.normal(size=(3,)).astype(np.float32)
  grads = [(rng.normal(size=(5, 3)) * 4).astype(np.float32) for _ in range(4)]
  bgrads = [rng.normal(size=(3,)).astype(np.float32) for _ in range(4)]
  lrs = [0.3, 0.2, 0.1, 0.05]

  for quirk in (True, False):
    cfg = _config(weight_decay=0.1, weight_decay_quirk=quirk)
    tx = optim.create_optimizer(cfg, lambda step: jnp.asarray(lrs)[step])
    params = {"dense": {"kernel": jnp.asarray(w0), "bias": jnp.asarray(b0)}}
    state = tx.init(params)
    for g, gb in zip(grads, bgrads):
      upd, state = tx.update({"dense": {"kernel": jnp.asarray(g), "bias": jnp.asarray(gb)}}, state, params)
      params = jax.tree.map(lambda p, u: p + u, params, upd)

    tw, tb = torch.tensor(w0, requires_grad=True), torch.tensor(b0, requires_grad=True)
    groups = [{"params": [tw], "weight_decay": 0.0 if quirk else 0.1}, {"params": [tb], "weight_decay": 0.0}]
    opt = torch.optim.SGD(groups, lr=lrs[0], momentum=0.9, nesterov=True)
    for i, (g, gb) in enumerate(zip(grads, bgrads)):
      for grp in opt.param_groups:
        grp["lr"] = lrs[i]
      tw.grad, tb.grad = torch.tensor(g), torch.tensor(gb)
      torch.nn.utils.clip_grad_norm_([tw, tb], 5.0)
      opt.step()
    np.testing.assert_allclose(np.asarray(params["dense"]["kernel"]), tw.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(params["dense"]["bias"]), tb.detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quirk,eps", [(False, 1e-8), (True, 0.5)])
def test_adamw_matches_torch(quirk, eps):
  """Clipped AdamW with weight decay on the kernel only (or on nothing: the quirk), as torch.optim.AdamW with
  Swin's two parameter groups. Every gradient element is at least 0.1 in size: with eps 1e-8 a near-zero one
  would take a step of lr * g / (|g| + eps) that float32 noise decides. eps 0.5 is as large as the gradients'
  scale, so where eps enters (outside the square root, after the bias correction) shows."""
  rng = np.random.default_rng(1)
  far_from_zero = lambda shape: (rng.choice([-1, 1], size=shape) * rng.uniform(0.1, 3, size=shape)).astype(np.float32)
  w0, b0 = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)
  grads = [(far_from_zero((5, 3)), far_from_zero((3,))) for _ in range(4)]
  lrs = [0.3, 0.2, 0.1, 0.05]

  cfg = _config(optimizer="adamw", weight_decay=0.05, weight_decay_quirk=quirk, adam_b1=0.8, adam_b2=0.99,
                adam_eps=eps)
  tx = optim.create_optimizer(cfg, lambda step: jnp.asarray(lrs)[step])
  params = {"dense": {"kernel": jnp.asarray(w0), "bias": jnp.asarray(b0)}}
  state = tx.init(params)
  for g, gb in grads:
    upd, state = tx.update({"dense": {"kernel": jnp.asarray(g), "bias": jnp.asarray(gb)}}, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, upd)

  tw, tb = torch.tensor(w0, requires_grad=True), torch.tensor(b0, requires_grad=True)
  groups = [{"params": [tw], "weight_decay": 0.0 if quirk else 0.05}, {"params": [tb], "weight_decay": 0.0}]
  opt = torch.optim.AdamW(groups, lr=lrs[0], betas=(0.8, 0.99), eps=eps)
  norms = []
  for i, (g, gb) in enumerate(grads):
    for grp in opt.param_groups:
      grp["lr"] = lrs[i]
    tw.grad, tb.grad = torch.tensor(g), torch.tensor(gb)
    norms.append(float(torch.nn.utils.clip_grad_norm_([tw, tb], 5.0)))
    opt.step()
  assert min(norms) > 5.0  # Every step clipped: the clip's scale reaches Adam only through eps and the moments.
  np.testing.assert_allclose(np.asarray(params["dense"]["kernel"]), tw.detach().numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(params["dense"]["bias"]), tb.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_weight_decay_mask():
  params = {"a": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)}, "norm": {"scale": jnp.ones(4)},
            "conv": {"kernel": jnp.zeros((3, 3, 1, 4))}}
  mask = optim.weight_decay_mask(params)
  assert mask == {"a": {"kernel": True, "bias": False}, "norm": {"scale": False}, "conv": {"kernel": True}}
