"""The train state: everything a step reads and writes, as one pytree."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Step counter, parameters, optimizer state and the run's base PRNG key.

  The key never changes: each step folds its step number in, so a resumed run
  draws the same dropout / mixup randomness as an uninterrupted one.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32[2] key (checkpoints as a plain array)


def create_train_state(rng: jax.Array, params: Any, tx: optax.GradientTransformation) -> TrainState:
  """A fresh state at step 0."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)
