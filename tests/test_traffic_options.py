"""The traffic cuts' model options (docs/traffic_cuts.md): same forward, same gradients to rounding."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vfocal_jax import train_config
from vfocal_jax.configs import default
from vfocal_jax.errors import ConfigError
from vfocal_jax.models import create_model
from vfocal_jax.models import layers

FRAMES, SIZE = 4, 32
ARCH = dict(embed_dim=8, depths=(1, 1, 1, 1), num_classes=5, num_frames=FRAMES, drop_path_rate=0.3, drop_rate=0.1,
            depthwise_impl="xla")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_recompute_layer_norm_is_flax_layer_norm(dtype):
  with jax.enable_x64(dtype == "float64"):
    dtype = jnp.dtype(dtype)
    rng = np.random.default_rng(0)
    x = jnp.asarray(3 + 2 * rng.normal(size=(2, 5, 7, 24)), dtype)
    ref, new = nn.LayerNorm(epsilon=1e-5, dtype=dtype), layers.RecomputeLayerNorm(epsilon=1e-5, dtype=dtype)
    pdt = jnp.promote_types(dtype, jnp.float32)
    params = {"scale": jnp.asarray(1 + rng.normal(size=24), pdt), "bias": jnp.asarray(rng.normal(size=24), pdt)}
    assert jax.tree.map(jnp.shape, new.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, ref.init(
        jax.random.key(0), x))
    want, got = jax.jit(ref.apply)({"params": params}, x), jax.jit(new.apply)({"params": params}, x)
    assert got.dtype == want.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float64), np.asarray(want, np.float64))  # op for op
    w = jnp.asarray(rng.normal(size=x.shape), dtype)
    loss = lambda m: lambda p, x: jnp.sum((m.apply({"params": p}, x) * w).astype(pdt) ** 2)
    g_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(params, x)
    g_new = jax.jit(jax.grad(loss(new), argnums=(0, 1)))(params, x)
    tol = {jnp.dtype("float64"): 1e-12, jnp.dtype("float32"): 2e-5, jnp.dtype("bfloat16"): 2e-2}[dtype]
    for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_ref)):
      assert a.dtype == b.dtype
      np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol,
                                 atol=tol * np.abs(np.asarray(b, np.float64)).max())


def _loss_and_grads(model, params, video):
  def loss(p):
    out = model.apply({"params": p}, video, train=True, rngs={"dropout": jax.random.key(2)})
    return jnp.sum(out * jnp.arange(1, out.shape[-1] + 1))
  return jax.jit(jax.value_and_grad(loss))(params)


# Each option appears with the design and norms it interacts with (a case compiles five programs: kept few).
@pytest.mark.parametrize("options", [dict(layer_norm_impl="recompute", use_postln=True,
                                          use_postln_in_modulation=True),
                                     dict(focal_projection="split", temporal_layout="frames"),
                                     dict(focal_projection="split", design="joint3d"),
                                     dict(focal_projection="split", layer_norm_impl="recompute", design="sequential"),
                                     dict(focal_projection="split_spatial")])
def test_model_options_give_the_same_loss_and_gradients(options):
  video = jnp.asarray(np.random.default_rng(0).normal(size=(2, FRAMES, SIZE, SIZE, 3)), jnp.float32)
  arch = {k: v for k, v in options.items() if k.startswith("use_") or k == "design"}
  base = create_model("custom", **{**ARCH, **arch})
  params = jax.jit(base.init)(jax.random.key(0), video)["params"]
  model = base.clone(**options)
  assert jax.tree.map(jnp.shape, jax.eval_shape(model.init, jax.random.key(0), video)["params"]) == jax.tree.map(
      jnp.shape, params)
  np.testing.assert_array_equal(jax.jit(model.apply)({"params": params}, video),
                                jax.jit(base.apply)({"params": params}, video))
  want_loss, want = _loss_and_grads(base, params, video)
  got_loss, got = _loss_and_grads(model, params, video)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max()), got, want)


@pytest.mark.parametrize("field,value,expected", [("layer_norm_impl", "fast", "flax, recompute"),
                                                  ("focal_projection", "rows", "fused, split, split_spatial")])
def test_a_bad_option_is_one_config_error_naming_the_field(field, value, expected):
  model = create_model("custom", **{**ARCH, field: value})
  video = jnp.zeros((1, FRAMES, SIZE, SIZE, 3))
  with pytest.raises(ConfigError, match=rf"^model\.{field}='{value}': expected one of {expected}\."):
    jax.eval_shape(model.init, jax.random.key(0), video)
  config = default.get_config()
  config.model[field] = value
  with pytest.raises(ValueError, match=rf"--config\.model\.{field}={value}: expected one of {expected}"):
    train_config.validate(config, num_devices=1, num_processes=1)


@pytest.mark.parametrize("design", ["parallel", "joint3d"])
def test_split_projection_float64(design):
  """focal_projection='split' computes the released function: float64 agrees with 'fused' to rounding."""
  with jax.enable_x64(True):
    video = jnp.asarray(np.random.default_rng(1).normal(size=(2, FRAMES, SIZE, SIZE, 3)), jnp.float64)
    base = create_model("custom", design=design, dtype=jnp.float64, param_dtype=jnp.float64, **ARCH)
    params = jax.jit(base.init)(jax.random.key(0), video)["params"]
    params = jax.tree.map(lambda p: p + 0.3 * np.random.default_rng(p.size).normal(size=p.shape), params)
    want = jax.jit(base.apply)({"params": params}, video)
    got = jax.jit(base.clone(focal_projection="split").apply)({"params": params}, video)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
