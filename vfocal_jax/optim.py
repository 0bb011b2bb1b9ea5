"""Learning-rate schedule and optimizer of the official recipe, in optax.

The released PyTorch code (a Swin/FocalNet descendant) does three things this
module reproduces:

* it scales ``base_lr``, ``warmup_lr`` and ``min_lr`` by
  ``global_batch * accumulation_steps / 512``;
* it uses timm's ``CosineLRScheduler`` per step with ``warmup_prefix=False``:
  a linear warm-up from ``warmup_lr`` to ``base_lr`` over the warm-up steps,
  then ``min_lr + (base_lr - min_lr) * (1 + cos(pi * t / total)) / 2`` where
  ``t`` counts from the start of training (not from the end of the warm-up),
  and ``min_lr`` after ``total`` steps;
* it clips the gradient's global norm (5.0) before an SGD step with Nesterov
  momentum 0.9.

(The released loop calls ``step_update`` after each optimizer step, so its
update k uses the schedule at k - 1; here update k uses step k.)

Its optimizer builder puts every parameter into the no-weight-decay group, so
the configured weight decay (1e-4) is never applied. ``weight_decay_quirk=True``
(the official recipes' setting) reproduces that; ``False`` applies the decay to
kernels only (``weight_decay_mask``), as the recipe intended.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

Schedule = Callable[[jax.Array | int], jax.Array]

# The recipe's reference batch for linear LR scaling.
LR_REFERENCE_BATCH = 512


def scaled_lr(lr: float, global_batch_size: int, accumulation_steps: int = 1) -> float:
  """Linear scaling rule of the official code: ``lr * batch * accumulation / 512``."""
  return lr * global_batch_size * max(accumulation_steps, 1) / LR_REFERENCE_BATCH


def warmup_cosine_schedule(*, base_lr: float, warmup_lr: float, min_lr: float,
                           warmup_steps: int, total_steps: int) -> Schedule:
  """timm ``CosineLRScheduler(t_initial=total, warmup_t=warmup, warmup_prefix=False)``.

  Args:
    base_lr: peak learning rate (already scaled).
    warmup_lr: learning rate at step 0.
    min_lr: learning rate at and after ``total_steps``.
    warmup_steps: length of the linear warm-up, in optimizer updates.
    total_steps: length of the whole schedule (warm-up included).

  Returns:
    An optax schedule: step -> learning rate (float32).
  """
  total_steps = max(int(total_steps), 1)
  warmup_steps = int(warmup_steps)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    warm = warmup_lr + t * (base_lr - warmup_lr) / max(warmup_steps, 1)
    cosine = min_lr + 0.5 * (base_lr - min_lr) * (1.0 + jnp.cos(math.pi * t / total_steps))
    lr = jnp.where(t < warmup_steps, warm, cosine)
    return jnp.where(t >= total_steps, min_lr, lr).astype(jnp.float32)

  return schedule


def create_learning_rate_schedule(config: Any, steps_per_epoch: int) -> Schedule:
  """The schedule of ``config`` (epochs converted to optimizer updates)."""
  scale = lambda lr: scaled_lr(lr, config.batch_size, config.accumulation_steps)
  if config.get("lr_scaling", True):
    base_lr, warmup_lr, min_lr = scale(config.base_lr), scale(config.warmup_lr), scale(config.min_lr)
  else:
    base_lr, warmup_lr, min_lr = config.base_lr, config.warmup_lr, config.min_lr
  total = total_train_steps(config, steps_per_epoch)
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  if config.get("num_train_steps", -1) > 0 and config.get("warmup_steps", -1) >= 0:
    warmup = config.warmup_steps
  return warmup_cosine_schedule(base_lr=base_lr, warmup_lr=warmup_lr, min_lr=min_lr,
                                warmup_steps=warmup, total_steps=total)


def total_train_steps(config: Any, steps_per_epoch: int) -> int:
  """Number of optimizer updates: ``num_train_steps`` if set, else epochs x steps/epoch."""
  if config.get("num_train_steps", -1) > 0:
    return int(config.num_train_steps)
  return int(config.num_epochs * steps_per_epoch)


def weight_decay_mask(params: Any) -> Any:
  """True for parameters that should decay: kernels (ndim > 1), not biases, norms, gammas."""
  flat = traverse_util.flatten_dict(params)
  mask = {k: (k[-1] == "kernel" and jnp.ndim(v) > 1) for k, v in flat.items()}
  return traverse_util.unflatten_dict(mask)


def create_optimizer(config: Any, schedule: Schedule) -> optax.GradientTransformation:
  """SGD-Nesterov or AdamW with gradient clipping and the weight-decay policy of ``config``.

  Gradient accumulation is done inside the train step (micro-batches), so one
  call of this optimizer is one official optimizer update.
  """
  wd = 0.0 if config.weight_decay_quirk else float(config.weight_decay)
  parts = []
  if config.grad_clip_norm and config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  name = config.optimizer.lower()
  if name == "sgd":
    # PyTorch SGD: L2 added to the gradient before the (Nesterov) momentum.
    if wd:
      parts.append(optax.add_decayed_weights(wd, mask=weight_decay_mask))
    parts.append(optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov))
  elif name == "adamw":
    parts.append(optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                             weight_decay=wd, mask=weight_decay_mask))
  else:
    raise ValueError(f"config.optimizer={config.optimizer!r}: expected 'sgd' or 'adamw'.")
  return optax.chain(*parts)
