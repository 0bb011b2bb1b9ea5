"""One SGD step of a tiny Video-FocalNet: the same loss and parameters on every mesh.

SGD (the official optimizer), not Adam: Adam's scale invariance would hide a
gradient that is off by a constant factor, e.g. a sharded depthwise-conv kernel
gradient off by the 'model' axis size, as XLA's grouped convolution once was.

On CPU ``depthwise_impl='auto'`` picks the shifted multiplies; TPU and GPU run
XLA's grouped convolution (``'xla'``), so the last test repeats a sharded step
on that path (against the unsharded step, which must agree whichever path).
"""
import jax
import numpy as np
import pytest
from flax import traverse_util

from multihost_worker import run_steps, tiny_config
from vfocal_jax import sharding


@pytest.fixture(scope="module")
def reference():
  config = tiny_config(mesh_shape=(1, 1))
  return run_steps(config, 1, mesh=sharding.create_mesh((1, 1), jax.devices()[:1]))


def _assert_same(result, reference):
  losses, params = result
  ref_losses, ref_params = reference
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  flat, ref_flat = traverse_util.flatten_dict(params, sep="/"), traverse_util.flatten_dict(ref_params, sep="/")
  assert flat.keys() == ref_flat.keys()
  for key in ref_flat:
    np.testing.assert_allclose(flat[key], ref_flat[key], rtol=1e-4, atol=2e-5, err_msg=key)


# Each case compiles a sharded step for 8 devices (the suite's costliest compiles): model-sharded params on one
# mesh, fully sharded (FSDP) on the transposed one; replicated params below.
@pytest.mark.parametrize("mesh_shape,fsdp", [((4, 2), False), ((2, 4), True)])
def test_sgd_step_matches_single_device(reference, mesh_shape, fsdp):
  _assert_same(run_steps(tiny_config(mesh_shape=mesh_shape, fsdp=fsdp), 1), reference)


def test_sgd_step_matches_with_replicated_params(reference):
  # Pure data parallelism with a 'model' axis > 1: the setting of the depthwise-gradient bug.
  _assert_same(run_steps(tiny_config(mesh_shape=(4, 2)), 1, rules=((r".*", None),)), reference)


def test_sgd_step_matches_single_device_xla_depthwise(reference):
  # The path TPU and GPU take (XLA's grouped convolution) in the setting of the depthwise-gradient bug: replicated
  # kernels, a 'model' axis of 2. Against the unsharded step on the CPU path (shifted multiplies): the same maths.
  # (Model-sharded kernels on this path also match; left out to keep the file's compile time down.)
  config = tiny_config(mesh_shape=(4, 2), **{"model.depthwise_impl": "xla"})
  _assert_same(run_steps(config, 1, rules=((r".*", None),)), reference)
