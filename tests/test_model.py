"""Flax VideoFocalNet vs an independent PyTorch forward (benchmarks/torch_video_focalnet.py), every parameter random."""
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from flax import traverse_util

import torch

from benchmarks import torch_video_focalnet as tvf  # The repository root is on sys.path (conftest).
from vfocal_jax.convert.mapping import (
    CheckpointMismatchError, flax_to_torch_state_dict, init_from_imagenet, torch_key, torch_to_flax)
from vfocal_jax.models import DESIGNS, create_model

FRAMES, SIZE = 4, 32
ARCH = dict(embed_dim=8, depths=(1, 1, 2, 1), num_classes=5)
OPTIONS = {
    "plain": {},
    "postln_layerscale": dict(use_postln=True, use_layerscale=True, layerscale_value=0.5),
    "modulation_options": dict(use_postln_in_modulation=True, normalize_modulator=True),
}


def _pair(tubelet, options, seed=0):
  torch.manual_seed(seed)
  ref = tvf.randomize_(tvf.VideoFocalNet(num_frames=FRAMES, tubelet_size=tubelet, drop_path_rate=0.0,
                                         **ARCH, **options), seed=seed).eval()
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  model = create_model("custom", num_frames=FRAMES, tubelet_size=tubelet, **ARCH, **options)
  return ref, sd, model


def _video(seed=0):
  return np.random.default_rng(seed).normal(size=(2, FRAMES, SIZE, SIZE, 3))


# The options change the blocks and the tubelet changes the stem, independently: each is covered once.
@pytest.mark.parametrize("options,tubelet", [("plain", 1), ("postln_layerscale", 2), ("modulation_options", 2)])
def test_float64_parity_with_pytorch(tubelet, options):
  ref, sd, model = _pair(tubelet, OPTIONS[options])
  video = _video()
  with torch.no_grad():
    expected = ref.double()(torch.from_numpy(video).permute(0, 1, 4, 2, 3)).numpy()
  with jax.enable_x64(True):
    model64 = model.clone(dtype=jnp.float64, param_dtype=jnp.float64)
    variables = torch_to_flax({k: v.astype(np.float64) for k, v in sd.items()}, model64)
    got = np.asarray(jax.jit(model64.apply)(variables, jnp.asarray(video)))
  assert np.abs(expected).max() > 0.1  # every branch moves the logits
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("impl,tubelet", [("xla", 1), ("shift", 2)])
def test_float32_parity_with_pytorch(tubelet, impl):
  ref, sd, model = _pair(tubelet, {}, seed=3)
  video = _video(1).astype(np.float32)
  with torch.no_grad():
    expected = ref(torch.from_numpy(video).permute(0, 1, 4, 2, 3)).numpy()
  model = model.clone(depthwise_impl=impl)
  got = np.asarray(jax.jit(model.apply)(torch_to_flax(sd, model), jnp.asarray(video)))
  np.testing.assert_allclose(got, expected, rtol=0, atol=5e-5)


def test_round_trip_is_bit_exact():
  _, sd, model = _pair(2, OPTIONS["postln_layerscale"])
  back = flax_to_torch_state_dict(torch_to_flax(sd, model), model)
  assert set(back) == set(sd)
  for key, value in sd.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_mismatched_state_dict_lists_every_key():
  _, sd, model = _pair(1, {})
  sd = dict(sd)
  del sd["layers.0.blocks.0.modulation.f.weight"]
  sd["extra.weight"] = np.zeros(3, np.float32)
  sd["head.weight"] = np.zeros((7, 64), np.float32)
  with pytest.raises(CheckpointMismatchError) as err:
    torch_to_flax(sd, model)
  message = str(err.value)
  for key in ("layers.0.blocks.0.modulation.f.weight", "extra.weight", "head.weight"):
    assert key in message
  variables, report = torch_to_flax(sd, model, allow_partial=True)
  assert report["missing"] == ["layers.0.blocks.0.modulation.f.weight"]
  assert report["unexpected"] == ["extra.weight"] and len(report["shape_mismatch"]) == 1
  jax.jit(model.apply)(variables, jnp.zeros((1, FRAMES, SIZE, SIZE, 3)))


def test_official_sizes_convert_without_leftovers():
  """T/S/B with 400 classes: the published parameter counts, and every official key maps."""
  expected = {"tiny": 49_553_272, "small": 88_735_168, "base": 157_389_216}
  for variant, count in expected.items():
    ref = tvf.VideoFocalNet(**dict(tiny=dict(embed_dim=96, depths=(2, 2, 6, 2)),
                                   small=dict(embed_dim=96, depths=(2, 2, 18, 2)),
                                   base=dict(embed_dim=128, depths=(2, 2, 18, 2)))[variant], num_classes=400)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    del ref
    model = create_model(variant, num_classes=400)
    video = jnp.zeros((1, 8, 224, 224, 3))
    shapes = traverse_util.flatten_dict(jax.eval_shape(lambda m=model: m.init(jax.random.key(0), video))["params"])
    assert sum(int(np.prod(s.shape)) for s in shapes.values()) == count
    ours = {torch_key(p): tuple(reversed(s.shape)) if len(s.shape) == 2 else None for p, s in shapes.items()}
    assert set(ours) == set(ref_shapes), variant
    assert sum(int(np.prod(s)) for s in ref_shapes.values()) == count


def test_imagenet_init_copies_spatial_inflates_stem_keeps_temporal_fresh():
  _, sd, model = _pair(2, {})
  sd_2d = {k: v for k, v in sd.items() if "temporal" not in k and not k.startswith("head.")}
  stem = np.random.default_rng(0).normal(size=(8, 3, 4, 4)).astype(np.float32)
  sd_2d["patch_embed.proj.weight"] = stem
  variables, report = init_from_imagenet(sd_2d, model, jax.random.key(1))
  kernel = np.asarray(variables["params"]["patch_embed"]["proj"]["kernel"])  # (tb, kh, kw, in, out)
  np.testing.assert_allclose(kernel[0], stem.transpose(2, 3, 1, 0) / 2, rtol=1e-6)
  np.testing.assert_array_equal(kernel[0], kernel[1])
  np.testing.assert_array_equal(variables["params"]["layers_1"]["blocks_0"]["mlp"]["fc1"]["kernel"],
                                sd["layers.1.blocks.0.mlp.fc1.weight"].T)
  assert "layers.0.blocks.0.modulation.f_temporal.weight" in report["fresh"] and "head.weight" in report["fresh"]
  assert not report["unused"]


def test_design_space_structure_and_temporal_sensitivity():
  video = jnp.asarray(_video(2), jnp.float32)
  reversed_video = video[:, ::-1]
  for design in DESIGNS:
    model = create_model("custom", num_frames=FRAMES, design=design, **ARCH)
    variables = jax.jit(model.init)(jax.random.key(0), video)
    # The official init leaves gates near zero, hiding time; perturb every parameter.
    leaves, treedef = jax.tree.flatten(variables)
    rng = np.random.default_rng(0)
    variables = jax.tree.unflatten(treedef, [
        np.asarray(x) + 0.3 * rng.normal(size=x.shape).astype(np.float32) for x in leaves])
    mod = variables["params"]["layers_0"]["blocks_0"]["modulation"]
    assert ("f_temporal" in mod) == (design in ("parallel", "sequential")), design
    if design == "joint3d":
      assert mod["focal_layers_0"]["kernel"].shape == (3, 3, 3, 1, 8)
    apply = jax.jit(model.apply)
    out, rev = apply(variables, video), apply(variables, reversed_video)
    # A per-frame model averaged over time cannot tell a clip from its reverse.
    if design == "spatial_only":
      np.testing.assert_allclose(out, rev, atol=1e-5)
    else:
      assert np.abs(out - rev).max() > 1e-4, design
  depthwise = create_model("custom", num_frames=FRAMES, temporal_conv="depthwise", **ARCH)
  kernel = jax.eval_shape(depthwise.init, jax.random.key(0), video)["params"]["layers_0"]["blocks_0"]["modulation"][
      "focal_layers_temporal_1"]["kernel"]
  assert kernel.shape == (5, 1, 8)


# --- The focal modulation of each design, against NumPy float64 written from docs/design_space.md. ---------

def _np_gelu(x):
  return 0.5 * x * (1.0 + scipy.special.erf(x / np.sqrt(2.0)))


def _np_same_conv(x, kernel, axes):
  """Zero-padded, stride-1 cross-correlation over ``axes`` of x (..., C_in); ``kernel`` (*K, C) per channel
  (depthwise) or (*K, C_in, C_out) (dense)."""
  ks = kernel.shape[:len(axes)]
  pads = [(0, 0)] * x.ndim
  for axis, k in zip(axes, ks):
    pads[axis] = (k // 2, k // 2)
  xp = np.pad(x, pads)
  out = 0.0
  for taps in itertools.product(*map(range, ks)):
    window = [slice(None)] * x.ndim
    for axis, tap, n in zip(axes, taps, (x.shape[a] for a in axes)):
      window[axis] = slice(tap, tap + n)
    w = kernel[taps]
    out = out + (xp[tuple(window)] * w if w.ndim == 1 else xp[tuple(window)] @ w)
  return out


def _np_focal_context(ctx, gates, convs, axes):
  """Levels l: ctx <- GELU(conv_l(ctx)), gated by gate l; then GELU(mean of the last level), by the last gate."""
  total = 0.0
  for level, conv in enumerate(convs):
    ctx = _np_gelu(conv(ctx))
    total = total + ctx * gates[..., level:level + 1]
  return total + _np_gelu(ctx.mean(axes, keepdims=True)) * gates[..., len(convs):]


def _np_modulation(p, x, design, frames):
  """One focal modulation of tokens x (B*T, H, W, C), float64."""
  c = x.shape[-1]
  dense = lambda v, name: v @ p[name]["kernel"].reshape(-1, p[name]["bias"].size) + p[name]["bias"]
  levels = len([k for k in p if k.startswith("focal_layers_") and "temporal" not in k])

  def spatial(v):   # per frame: depthwise k x k levels over (H, W)
    q, ctx, gates = np.split(dense(v, "f"), [c, 2 * c], axis=-1)
    convs = [lambda u, l=l: _np_same_conv(u, p[f"focal_layers_{l}"]["kernel"][..., 0, :], (1, 2))
             for l in range(levels)]
    return q, dense(_np_focal_context(ctx, gates, convs, (1, 2)), "h")

  def temporal(v):  # per position: dense C -> C convs of size k over time
    v = v.reshape(-1, frames, *v.shape[1:])
    ctx, gates = np.split(dense(v, "f_temporal"), [c], axis=-1)
    convs = [lambda u, l=l: _np_same_conv(u, p[f"focal_layers_temporal_{l}"]["kernel"], (1,)) for l in range(levels)]
    return dense(_np_focal_context(ctx, gates, convs, (1,)), "h_temporal").reshape(x.shape)

  if design == "parallel":
    q, m = spatial(x)
    out = q * m * temporal(x)
  elif design == "spatial_only":
    q, m = spatial(x)
    out = q * m
  elif design == "sequential":   # s = q * m_spatial(x), then s * m_temporal(s)
    q, m = spatial(x)
    out = q * m * temporal(q * m)
  else:                          # joint3d: depthwise k x k x k levels over (T, H, W), pooled over all three
    xs = dense(x, "f").reshape(-1, frames, *x.shape[1:3], 2 * c + levels + 1)
    q, ctx, gates = np.split(xs, [c, 2 * c], axis=-1)
    convs = [lambda u, l=l: _np_same_conv(u, p[f"focal_layers_{l}"]["kernel"][..., 0, :], (1, 2, 3))
             for l in range(levels)]
    out = (q * dense(_np_focal_context(ctx, gates, convs, (1, 2, 3)), "h")).reshape(x.shape)
  return dense(out, "proj")


def test_each_design_matches_its_numpy_definition():
  """parallel (released; the full model matches PyTorch above) also checks the reference itself."""
  from vfocal_jax.models.video_focalnet import FocalModulation  # noqa: PLC0415
  frames, rng = 4, np.random.default_rng(5)
  x = rng.normal(size=(2 * frames, 6, 6, 4))
  outs, drawn = {}, {}
  with jax.enable_x64(True):
    for design in DESIGNS:
      module = FocalModulation(dim=4, focal_window=3, focal_level=2, num_frames=frames, design=design,
                               dtype=jnp.float64, param_dtype=jnp.float64)
      shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.asarray(x))["params"]
      key = str(jax.tree.map(jnp.shape, shapes))   # sequential has parallel's parameters: the same values
      params = drawn.setdefault(key, jax.tree.map(lambda s: 0.5 * rng.normal(size=s.shape), shapes))
      outs[design] = np.asarray(jax.jit(module.apply)({"params": params}, jnp.asarray(x)))
      want = _np_modulation(params, x, design, frames)
      assert np.abs(want).max() > 0.5, design
      np.testing.assert_allclose(outs[design], want, rtol=0, atol=1e-10, err_msg=design)
  assert np.abs(outs["sequential"] - outs["parallel"]).max() > 0.1


def test_train_mode_remat_and_sown_modulators():
  # XLA depthwise convs here: this test is about train mode and remat, and they compile fast.
  model = create_model("custom", num_frames=FRAMES, drop_path_rate=0.5, drop_rate=0.1, depthwise_impl="xla",
                       **ARCH)
  video = jnp.asarray(_video(3), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), video)
  eval_out, state = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(variables, video)
  mod = state["intermediates"]["layers_0"]["blocks_0"]["modulation"]
  assert mod["spatial_modulator"][0].shape == (2 * FRAMES, SIZE // 4, SIZE // 4, 8)
  assert mod["temporal_modulator"][0].shape == (2 * FRAMES, SIZE // 4, SIZE // 4, 8)

  def loss(params, m):
    out = m.apply({"params": params}, video, train=True, rngs={"dropout": jax.random.key(2)})
    return jnp.sum(out * jnp.arange(1, out.shape[-1] + 1)), out
  grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
  g1, train_out = grad(variables["params"], model)
  g2, train_out_remat = grad(variables["params"], model.clone(remat=True))
  assert np.abs(eval_out - train_out).max() > 1e-4  # dropout and drop-path act in train mode
  np.testing.assert_allclose(train_out_remat, train_out, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g1, g2)


def test_bfloat16_compute_keeps_float32_params():
  model = create_model("custom", num_frames=FRAMES, dtype=jnp.bfloat16, **ARCH)
  video = jnp.asarray(_video(4), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), video)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  # The program computes in bf16: every matmul and convolution takes and gives bf16 tensors.
  program = jax.jit(model.apply).lower(variables, video).as_text()
  products = re.findall(r"stablehlo\.(?:dot_general|convolution)\b.*: \((.*)\) -> (.*)$", program, re.MULTILINE)
  assert len(products) > 20
  for operands, result in products:
    assert [t.endswith("bf16>") for t in operands.split(", ")] == [True, True] and result.endswith("bf16>"), \
        (operands, result)
  out = np.asarray(jax.jit(model.apply)(variables, video), np.float64)
  assert out.dtype == np.float64 and jax.eval_shape(model.apply, variables, video).dtype == jnp.float32
  with jax.enable_x64(True):
    model64 = model.clone(dtype=jnp.float64, param_dtype=jnp.float64)
    ref = np.asarray(jax.jit(model64.apply)(jax.tree.map(lambda x: np.asarray(x, np.float64), variables),
                                            jnp.asarray(np.asarray(video, np.float64))))
  # bf16 keeps 8 significant bits: one rounding moves a value by up to 2**-8 of it. The logits carry a few
  # roundings of their own size (the head's output, its inputs, the pooled features): allowed 4 of them.
  scale = float(np.abs(ref).max())
  assert scale > 0.05
  np.testing.assert_allclose(out, ref, rtol=0, atol=4 * 2.0**-8 * scale)


def test_bad_inputs_name_the_problem():
  model = create_model("custom", num_frames=FRAMES, **ARCH)
  with pytest.raises(ValueError, match="num_frames=4"):
    model.init(jax.random.key(0), jnp.zeros((1, 3, SIZE, SIZE, 3)))
  with pytest.raises(ValueError, match="divisible by 32"):
    model.init(jax.random.key(0), jnp.zeros((1, FRAMES, 40, 40, 3)))
  with pytest.raises(ValueError, match="Unknown VideoFocalNet field"):
    create_model("tiny", embed_dims=4)
  with pytest.raises(ValueError, match="released design"):
    torch_to_flax({}, model.clone(design="joint3d"))


def test_dense_init_schemes():
  """'official' = timm trunc_normal(0.02) on every Linear; 'fan_in' = std 1/sqrt(fan_in); convs unchanged."""
  video = jnp.zeros((1, FRAMES, SIZE, SIZE, 3))
  arch = dict(ARCH, embed_dim=32, depths=(1, 1, 1, 1), depthwise_impl="xla")

  def init(**kw):
    model = create_model("custom", num_frames=FRAMES, **arch, **kw)
    return traverse_util.flatten_dict(jax.jit(model.init)(jax.random.key(0), video)["params"], sep="/")

  official, fan_in = init(), init(dense_init="fan_in")
  dense = [k for k in official if k.endswith("kernel") and official[k].ndim == 2]
  assert {k.split("/")[-2] for k in dense} == {"f", "f_temporal", "proj", "fc1", "fc2", "head"}
  for key in dense:
    w0, w1 = np.asarray(official[key]), np.asarray(fan_in[key])
    # Truncated at 2 std: the sample std is 0.88 x the parameter.
    np.testing.assert_allclose(w0.std(), 0.02 * 0.88, rtol=0.2, err_msg=key)
    np.testing.assert_allclose(w1.std(), 0.88 / np.sqrt(w1.shape[0]), rtol=0.2, err_msg=key)
  for key in official:
    if key not in dense:
      np.testing.assert_array_equal(official[key], fan_in[key], err_msg=key)
  with pytest.raises(ValueError, match="dense_init='xavier'"):
    create_model("custom", num_frames=FRAMES, dense_init="xavier", **ARCH).init(jax.random.key(0), video)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_pointwise_conv_matches_nn_conv(ndim):
  """layers.PointwiseConv (a matmul) == the 1x1 nn.Conv it replaces: same params (names, shapes, init), same output."""
  from vfocal_jax.models import layers  # noqa: PLC0415
  x = jnp.asarray(np.random.default_rng(ndim).normal(size=(2,) + (3,) * ndim + (5,)), jnp.float32)
  ref = layers.conv(7, (1,) * ndim, "h", jnp.float32, jnp.float32)
  new = layers.PointwiseConv(7, ndim, name="h")
  params = ref.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, new.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, params)
  np.testing.assert_array_equal(new.init(jax.random.key(0), x)["params"]["kernel"], params["params"]["kernel"])
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(1), p.shape), params)  # nonzero bias too
  np.testing.assert_allclose(jax.jit(new.apply)(params, x), jax.jit(ref.apply)(params, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kernel_shape", [(3,), (5,), (4,), (3, 3), (5, 5), (2, 4), (3, 3, 3)])
def test_shift_depthwise_gradients_match_grouped_conv(kernel_shape):
  """Gradients of the 'shift' depthwise conv (sum of shifted multiplies) == XLA's grouped conv, float64."""
  from vfocal_jax.models import layers  # noqa: PLC0415
  rng = np.random.default_rng(len(kernel_shape))
  with jax.enable_x64(True):
    x = jnp.asarray(rng.normal(size=(2,) + (6,) * len(kernel_shape) + (4,)))
    kernel = jnp.asarray(rng.normal(size=kernel_shape + (1, 4)))
    g = jnp.asarray(rng.normal(size=x.shape))            # a cotangent that weights every output

    def loss(impl):
      return lambda xx, kk: jnp.sum(layers.depthwise_conv(xx, kk, impl) * g)

    want = jax.grad(loss("xla"), argnums=(0, 1))(x, kernel)
    got = jax.jit(jax.grad(loss("shift"), argnums=(0, 1)))(x, kernel)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-12, atol=1e-12)
    assert got[1].dtype == kernel.dtype


def test_shift_depthwise_bfloat16_kernel_gradient_accumulates_in_float32():
  """bf16 compute: the kernel gradient (a sum over every position) comes back float32 and close to it."""
  from vfocal_jax.models import layers  # noqa: PLC0415
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 32, 32, 8)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 8)), jnp.float32)

  def grad_kernel(dtype):
    return jax.jit(jax.grad(lambda k: jnp.sum(layers.depthwise_conv(x.astype(dtype), k, "shift")
                                              .astype(jnp.float32))))(kernel)

  got, want = grad_kernel(jnp.bfloat16), grad_kernel(jnp.float32)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=2e-2, atol=0.5)  # bf16 inputs, float32 sums of 4096 terms


def test_gelu_value_and_gradient_match_torch_float64():
  """Our erf GELU and its hand-written VJP == torch's exact GELU and autograd, float64, tails included."""
  from vfocal_jax.models import layers  # noqa: PLC0415
  x = np.concatenate([np.linspace(-12, 12, 2001), np.random.default_rng(0).normal(size=1000) * 3])
  g = np.random.default_rng(1).normal(size=x.shape)
  xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
  yt = torch.nn.functional.gelu(xt)
  (yt * torch.tensor(g)).sum().backward()
  with jax.enable_x64(True):
    y, vjp = jax.vjp(jax.jit(layers.gelu), jnp.asarray(x))
    (dx,) = vjp(jnp.asarray(g))
  np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-13, atol=1e-15)
  np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-13, atol=1e-15)
