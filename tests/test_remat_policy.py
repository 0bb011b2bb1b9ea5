"""model.remat_policy: every policy gives no-remat's loss and gradients; a bad name is one config error."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vfocal_jax import train_config
from vfocal_jax.configs import default
from vfocal_jax.errors import ConfigError
from vfocal_jax.models import create_model
from vfocal_jax.models.video_focalnet import REMAT_POLICIES

FRAMES, SIZE = 4, 32
ARCH = dict(embed_dim=8, depths=(1, 1, 1, 1), num_classes=5, num_frames=FRAMES, drop_path_rate=0.3, drop_rate=0.1,
            depthwise_impl="xla")


def _video():
  return jnp.asarray(np.random.default_rng(0).normal(size=(2, FRAMES, SIZE, SIZE, 3)), jnp.float32)


def test_every_policy_gives_the_same_loss_and_gradients():
  model = create_model("custom", **ARCH)  # The policies name values inside a block: the same in every design.
  video = _video()
  params = jax.jit(model.init)(jax.random.key(0), video)["params"]

  def loss(p, m):
    out = m.apply({"params": p}, video, train=True, rngs={"dropout": jax.random.key(2)})
    return jnp.sum(out * jnp.arange(1, out.shape[-1] + 1))

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  want_loss, want = grad(params, model)
  assert abs(float(want_loss)) > 1e-3
  for name in REMAT_POLICIES:
    got_loss, got = grad(params, model.clone(remat=True, remat_policy=name))
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, err_msg=name)
    jax.tree.map(lambda a, b, name=name: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name),
                 got, want)


def test_the_modulators_policy_saves_the_modulators(capsys):
  """With 'modulators' the backward reads the named query and modulators instead of recomputing them."""
  model = create_model("custom", remat=True, remat_policy="modulators", **ARCH)
  video = _video()
  params = jax.jit(model.init)(jax.random.key(0), video)["params"]
  f = lambda p: jnp.sum(model.apply({"params": p}, video))
  jax.ad_checkpoint.print_saved_residuals(f, params)
  saved = capsys.readouterr().out
  for name in ("query", "spatial_modulator", "temporal_modulator"):
    assert saved.count(f"named '{name}'") == 4, (name, saved)  # One per block.


def test_a_bad_policy_is_one_config_error_naming_the_field():
  model = create_model("custom", remat=True, remat_policy="dots_saveable", **ARCH)
  with pytest.raises(ConfigError, match=r"^model\.remat_policy='dots_saveable': expected one of nothing, dots"):
    jax.eval_shape(model.init, jax.random.key(0), _video())
  config = default.get_config()
  config.model.remat_policy = "some"
  with pytest.raises(ValueError, match=r"--config\.model\.remat_policy=some: expected one of nothing, dots"):
    train_config.validate(config, num_devices=1, num_processes=1)
  config.model.remat_policy = "dots"
  train_config.validate(config, num_devices=1, num_processes=1)
