"""Gradient accumulation: ``accumulation_steps=2`` on a batch of 8 equals one step on the 8 clips.

With mixup and drop-path off a step is deterministic, and the mean loss over two micro-batches of 4 is the
mean over the 8 clips: the loss, the gradient norm and the parameters after two updates must be those of
the unaccumulated step, on one device and with the micro-batches split over a (4, 2) mesh.
"""
import jax
import numpy as np
import pytest
from flax import traverse_util

from helpers import StreamIterator, tiny_config
from vfocal_jax import sharding, train

STEPS = 2


def _config(**overrides):
  """Two stages, two frames, mixup and drop-path off, no clipping (it would hide a gradient off by a factor)."""
  return tiny_config(num_frames=2, mixup_alpha=0.0, cutmix_alpha=0.0, grad_clip_norm=0.0,
                     **{"model.depths": (1, 1), "model.focal_levels": (1, 1), "model.drop_path_rate": 0.0},
                     **overrides)


def _run(config, mesh=None):
  """``STEPS`` updates on the test stream (8 clips a step): per-step loss and gradient norm, final params."""
  trainer = train.Trainer(config, steps_per_epoch=100, mesh=mesh)
  state = trainer.init_state()
  it = StreamIterator(config)
  values = []
  with trainer.mesh:
    for _ in range(STEPS):
      state, metrics = trainer.train_step(state, trainer.put_batch(next(it)))
      values.append(sharding.to_host(metrics.compute()))
  return ([float(v["loss"]) for v in values], [float(v["grad_norm"]) for v in values],
          traverse_util.flatten_dict(sharding.to_host(state.params), sep="/"))


@pytest.fixture(scope="module")
def one_step_on_eight():
  config = _config(mesh_shape=(1, 1), batch_size=8, accumulation_steps=1)
  return _run(config, mesh=sharding.create_mesh((1, 1), jax.devices()[:1]))


@pytest.mark.parametrize("mesh_shape", [(1, 1), (4, 2)])
def test_two_micro_batches_of_four_equal_one_batch_of_eight(one_step_on_eight, mesh_shape):
  config = _config(mesh_shape=mesh_shape, batch_size=4, accumulation_steps=2)
  # The same learning rate: the recipe scales it by batch_size x accumulation_steps.
  assert train.optim.create_learning_rate_schedule(config, 100)(0) == 1.0
  mesh = sharding.create_mesh((1, 1), jax.devices()[:1]) if mesh_shape == (1, 1) else None
  losses, norms, params = _run(config, mesh)
  ref_losses, ref_norms, ref_params = one_step_on_eight
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  np.testing.assert_allclose(norms, ref_norms, rtol=1e-4)
  assert params.keys() == ref_params.keys()
  for key, ref in ref_params.items():
    np.testing.assert_allclose(params[key], ref, rtol=1e-4, atol=2e-5, err_msg=key)
