"""``temporal_layout='frames'`` (the temporal branch convolves along T in place) against PyTorch and 'regroup'."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks import torch_video_focalnet as tvf  # The repository root is on sys.path (conftest).
from vfocal_jax.convert.mapping import torch_to_flax
from vfocal_jax.models import create_model, layers

FRAMES, SIZE = 4, 32
ARCH = dict(embed_dim=8, depths=(1, 1, 1, 1), num_classes=5)


def test_frames_layout_float64_parity_with_pytorch():
  torch.manual_seed(0)
  ref = tvf.randomize_(tvf.VideoFocalNet(num_frames=FRAMES, drop_path_rate=0.0, **ARCH), seed=0).eval()
  sd = {k: v.detach().numpy().astype(np.float64) for k, v in ref.state_dict().items()}
  video = np.random.default_rng(0).normal(size=(2, FRAMES, SIZE, SIZE, 3))
  with torch.no_grad():
    expected = ref.double()(torch.from_numpy(video).permute(0, 1, 4, 2, 3)).numpy()
  with jax.enable_x64(True):
    model = create_model("custom", num_frames=FRAMES, temporal_layout="frames", dtype=jnp.float64,
                         param_dtype=jnp.float64, **ARCH)
    got = np.asarray(jax.jit(model.apply)(torch_to_flax(sd, model), jnp.asarray(video)))
  assert np.abs(expected).max() > 0.1
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("temporal_conv", ["dense", "depthwise"])
def test_layouts_give_the_same_parameters_and_gradients(temporal_conv):
  video = jnp.asarray(np.random.default_rng(1).normal(size=(2, FRAMES, SIZE, SIZE, 3)))
  grads = {}
  with jax.enable_x64(True):
    for layout in ("regroup", "frames"):
      model = create_model("custom", num_frames=FRAMES, temporal_layout=layout, temporal_conv=temporal_conv,
                           dense_init="fan_in", dtype=jnp.float64, param_dtype=jnp.float64, **ARCH)
      params = model.init(jax.random.PRNGKey(0), video.astype(jnp.float64))["params"]
      loss = lambda p, m=model: jnp.sum(m.apply({"params": p}, video.astype(jnp.float64)) ** 2)
      grads[layout] = (params, jax.jit(jax.grad(loss))(params))
  (p0, g0), (p1, g1) = grads["regroup"], grads["frames"]
  jax.tree.map(np.testing.assert_array_equal, p0, p1)  # Same names, shapes and init.
  kernel = g0["layers_0"]["blocks_0"]["modulation"]["focal_layers_temporal_0"]["kernel"]
  assert np.abs(np.asarray(kernel)).max() > 0  # The temporal convs take part in the loss.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), g0, g1)


def test_auto_layout_resolves_to_the_released_one():
  assert layers.resolve_temporal_layout("auto") == "regroup"
  assert layers.resolve_temporal_layout("frames") == "frames"
  with pytest.raises(ValueError, match="temporal_layout='rows'"):
    layers.resolve_temporal_layout("rows")
