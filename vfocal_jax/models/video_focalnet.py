"""Video-FocalNet (Wasim et al., ICCV 2023) as a Flax Linen module.

Parameter names mirror the official PyTorch state-dict keys (`layers.0.blocks.1
.modulation.f.weight` -> `layers_0/blocks_1/modulation/f/kernel`), so that
`vfocal_jax.convert.mapping` is a pure renaming plus transposes.

Tokens are channels-last `(B*T', H, W, C)`, frames folded batch-major
(row `b*T' + t`), as in the released code.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from vfocal_jax.errors import ConfigError
from vfocal_jax.models import layers
from vfocal_jax.models.layers import Dtype, conv, dense, gelu, layer_norm

DESIGNS = ("parallel", "spatial_only", "sequential", "joint3d")

# What a rematerialised block (`remat=True`) keeps from its forward pass for the backward; the rest is
# recomputed. Names saved by 'modulators' are `checkpoint_name`s in FocalModulation (identities otherwise).
MODULATOR_NAMES = ("query", "spatial_modulator", "temporal_modulator")
REMAT_POLICIES = {
    "nothing": None,  # jax.checkpoint's default (nothing_saveable): only the block's input. As before.
    "dots": jax.checkpoint_policies.dots_saveable,  # Every matmul/conv output.
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "modulators": jax.checkpoint_policies.save_only_these_names(*MODULATOR_NAMES),
    "everything": jax.checkpoint_policies.everything_saveable,
}


def remat_policy(name: str):
  """The `jax.checkpoint` policy named by `model.remat_policy`; a `ConfigError` naming the field otherwise."""
  if name not in REMAT_POLICIES:
    raise ConfigError(f"model.remat_policy={name!r}: expected one of {', '.join(REMAT_POLICIES)}.")
  return REMAT_POLICIES[name]


FOCAL_PROJECTIONS = ("fused", "split", "split_spatial")


def _focal_context(ctx: jax.Array, gates: Sequence[jax.Array], focal_convs: Sequence[Any],
                   pool_axes: tuple[int, ...]) -> jax.Array:
  """The focal hierarchy: gated sum of GELU(conv) levels plus the global level.

  `gates[l]` broadcasts against `ctx` (`(..., 1)`). The global level pools the *last* level's context
  (after its GELU).
  """
  ctx_all = 0.0
  for level, focal_conv in enumerate(focal_convs):
    ctx = gelu(focal_conv(ctx))
    ctx_all = ctx_all + ctx * gates[level]
  ctx_global = gelu(ctx.mean(pool_axes, keepdims=True))
  return ctx_all + ctx_global * gates[len(focal_convs)]


class FocalModulation(nn.Module):
  """Spatio-temporal focal modulation on `(B*T, H, W, C)` tokens; `design` picks the variant."""
  dim: int
  focal_window: int
  focal_level: int
  num_frames: int
  focal_factor: int = 2
  proj_drop: float = 0.0
  use_postln_in_modulation: bool = False
  normalize_modulator: bool = False
  design: str = "parallel"
  temporal_conv: str = "dense"
  depthwise_impl: str = "auto"
  temporal_layout: str = "auto"
  dense_init: str = "official"
  layer_norm_impl: str = "flax"
  focal_projection: str = "fused"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _dense(self, features: int, name: str) -> nn.Dense:
    return dense(features, name, self.dtype, self.param_dtype, init=self.dense_init)

  def _kernel(self, level: int) -> int:
    return self.focal_factor * level + self.focal_window

  def _project(self, x: jax.Array, widths: tuple[int, ...], name: str, shape: tuple[int, ...] | None = None
               ) -> tuple[list[jax.Array], list[jax.Array]]:
    """The focal projection `name` (a Dense to `sum(widths) + L + 1` channels): its `widths` groups and gates.

    Returns (groups, gates), each reshaped to `shape + (-1,)` if given; `gates[l]` is `(..., 1)`.
    `focal_projection='fused'` (as released): one matmul, sliced. 'split': the same parameters, one matmul per
    group and the L+1 gates as per-token reductions over the channels (accumulated in float32, then rounded to
    the compute dtype, plus the bias: as the matmul): no 1-channel arrays, which a TPU pads to 128 lanes.
    'split_spatial': 'split' for the spatial projection `f` only, `f_temporal` fused.
    """
    n_gates = self.focal_level + 1
    features = sum(widths) + n_gates
    shape = tuple(x.shape[:-1]) if shape is None else shape
    if self.focal_projection not in FOCAL_PROJECTIONS:
      raise ValueError(f"focal_projection={self.focal_projection!r}: expected one of {FOCAL_PROJECTIONS}.")
    if not (self.focal_projection == "split" or (self.focal_projection == "split_spatial" and name == "f")):
      xs = self._dense(features, name)(x).reshape(shape + (features,))
      bounds = [sum(widths[:i]) for i in range(len(widths) + 1)]
      groups = [xs[..., a:b] for a, b in zip(bounds, bounds[1:])]
      return groups, [xs[..., g:g + 1] for g in range(bounds[-1], features)]
    kernel, bias = layers.DenseParams(features, self.dense_init, self.param_dtype, name=name)(x.shape[-1])
    x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
    groups, start = [], 0
    for width in widths:
      y = lax.dot_general(x, kernel[:, start:start + width], (((x.ndim - 1,), (0,)), ((), ())))
      groups.append((y + bias[start:start + width]).reshape(shape + (width,)))
      start += width
    acc = jnp.promote_types(x.dtype, jnp.float32)
    xa = x.astype(acc)
    gates = [(jnp.sum(xa * kernel[:, g].astype(acc), axis=-1).astype(x.dtype) + bias[g]).reshape(shape + (1,))
             for g in range(start, features)]
    return groups, gates

  def _spatial(self, x: jax.Array, c: int) -> tuple[jax.Array, jax.Array]:
    """Returns (query, spatial modulator) of the image focal modulation."""
    (q, ctx), gates = self._project(x, (c, c), "f")
    convs = [layers.DepthwiseConv((k, k), self.depthwise_impl, self.dtype, self.param_dtype,
                                  name=f"focal_layers_{l}")
             for l, k in ((l, self._kernel(l)) for l in range(self.focal_level))]
    ctx_all = _focal_context(ctx, gates, convs, (1, 2))
    if self.normalize_modulator:
      ctx_all = ctx_all / (self.focal_level + 1)
    mod = layers.PointwiseConv(c, 2, self.dtype, self.param_dtype, name="h")(ctx_all)
    return checkpoint_name(q, "query"), checkpoint_name(mod, "spatial_modulator")

  def _temporal(self, x: jax.Array, c: int) -> jax.Array:
    """Temporal modulator of tokens `(B*T, H, W, C)`, returned in the same layout.

    Every op of the branch is per token or along T, so where the tokens live while
    it runs (`temporal_layout`) changes the memory traffic, not the result.
    """
    bt, h, w, _ = x.shape
    t = self.num_frames
    if self.temporal_conv not in ("dense", "depthwise"):
      raise ValueError(f"temporal_conv={self.temporal_conv!r}: expected 'dense' or 'depthwise'.")
    regroup = layers.resolve_temporal_layout(self.temporal_layout) == "regroup"
    if regroup:  # (B*H*W, T, C), as released.
      x = x.reshape(bt // t, t, h, w, c).transpose(0, 2, 3, 1, 4).reshape(-1, t, c)
    (ctx,), gates = self._project(x, (c,), "f_temporal", None if regroup else (bt // t, t, h, w))
    convs = [layers.TemporalConv(c, self._kernel(l), self.temporal_conv == "depthwise", self.depthwise_impl,
                                 self.dtype, self.param_dtype, name=f"focal_layers_temporal_{l}")
             for l in range(self.focal_level)]
    ctx_all = _focal_context(ctx, gates, convs, (1,))
    if self.normalize_modulator:
      ctx_all = ctx_all / (self.focal_level + 1)
    mod = layers.PointwiseConv(c, 1, self.dtype, self.param_dtype, name="h_temporal")(ctx_all)
    if regroup:
      return mod.reshape(bt // t, h, w, t, c).transpose(0, 3, 1, 2, 4).reshape(bt, h, w, c)
    return mod.reshape(bt, h, w, c)

  def _joint3d(self, x: jax.Array, c: int) -> tuple[jax.Array, jax.Array]:
    """One focal hierarchy of depthwise 3-D convs over (T, H, W)."""
    bt, h, w, _ = x.shape
    t = self.num_frames
    (q, ctx), gates = self._project(x, (c, c), "f", (bt // t, t, h, w))
    convs = [layers.DepthwiseConv((k, k, k), self.depthwise_impl, self.dtype, self.param_dtype,
                                  name=f"focal_layers_{l}")
             for l, k in ((l, self._kernel(l)) for l in range(self.focal_level))]
    ctx_all = _focal_context(ctx, gates, convs, (1, 2, 3))
    if self.normalize_modulator:
      ctx_all = ctx_all / (self.focal_level + 1)
    mod = layers.PointwiseConv(c, 3, self.dtype, self.param_dtype, name="h")(ctx_all)
    return (checkpoint_name(q.reshape(bt, h, w, c), "query"),
            checkpoint_name(mod.reshape(bt, h, w, c), "spatial_modulator"))

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    c = x.shape[-1]
    if self.design == "parallel":
      q, mod = self._spatial(x, c)
      mod_t = checkpoint_name(self._temporal(x, c), "temporal_modulator")
      self.sow("intermediates", "temporal_modulator", mod_t)
      out = q * mod * mod_t
    elif self.design == "spatial_only":
      q, mod = self._spatial(x, c)
      out = q * mod
    elif self.design == "sequential":
      q, mod = self._spatial(x, c)
      out = q * mod
      mod_t = self._temporal(out, c)
      self.sow("intermediates", "temporal_modulator", mod_t)
      out = out * checkpoint_name(mod_t, "temporal_modulator")
    elif self.design == "joint3d":
      q, mod = self._joint3d(x, c)
      out = q * mod
    else:
      raise ValueError(f"design={self.design!r}: expected one of {DESIGNS}.")
    self.sow("intermediates", "spatial_modulator", mod)
    if self.use_postln_in_modulation:
      out = layer_norm("ln", self.dtype, self.layer_norm_impl)(out)
    out = self._dense(c, "proj")(out)
    return nn.Dropout(self.proj_drop, deterministic=not train)(out)


class Mlp(nn.Module):
  hidden: int
  drop: float = 0.0
  dense_init: str = "official"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    c = x.shape[-1]
    x = gelu(dense(self.hidden, "fc1", self.dtype, self.param_dtype, init=self.dense_init)(x))
    x = nn.Dropout(self.drop, deterministic=not train)(x)
    x = dense(c, "fc2", self.dtype, self.param_dtype, init=self.dense_init)(x)
    return nn.Dropout(self.drop, deterministic=not train)(x)


class VideoFocalNetBlock(nn.Module):
  """Pre-norm residual block: modulation then MLP, each with drop path and optional layerscale."""
  modulation_kwargs: dict
  mlp_ratio: float = 4.0
  drop: float = 0.0
  drop_path: float = 0.0
  use_layerscale: bool = False
  layerscale_value: float = 1e-4
  use_postln: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    c = x.shape[-1]
    if self.use_layerscale:
      init = nn.initializers.constant(self.layerscale_value)
      gamma_1 = self.param("gamma_1", init, (c,), self.param_dtype)
      gamma_2 = self.param("gamma_2", init, (c,), self.param_dtype)
    else:
      gamma_1 = gamma_2 = 1.0
    impl = self.modulation_kwargs.get("layer_norm_impl", "flax")
    norm1, norm2 = layer_norm("norm1", self.dtype, impl), layer_norm("norm2", self.dtype, impl)
    modulation = FocalModulation(dim=c, proj_drop=self.drop, dtype=self.dtype, param_dtype=self.param_dtype,
                                 name="modulation", **self.modulation_kwargs)
    mlp = Mlp(int(c * self.mlp_ratio), self.drop, self.modulation_kwargs.get("dense_init", "official"), self.dtype,
              self.param_dtype, name="mlp")
    dp = layers.drop_path(self.drop_path, deterministic=not train)
    if self.use_postln:
      x = x + dp(gamma_1 * norm1(modulation(x, train)))
      x = x + dp(gamma_2 * norm2(mlp(x, train)))
    else:
      x = x + dp(gamma_1 * modulation(norm1(x), train))
      x = x + dp(gamma_2 * mlp(norm2(x), train))
    return x


class PatchEmbed(nn.Module):
  """Stem (patch or tubelet conv) and inter-stage downsample, each followed by LayerNorm."""
  embed_dim: int
  patch_size: int
  tubelet_size: int = 1
  use_conv_embed: bool = False
  is_stem: bool = False
  layer_norm_impl: str = "flax"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, T, H, W, 3) for a tubelet stem, else (N, H, W, C); returns (N', H', W', C')."""
    if self.use_conv_embed:
      kernel, pad, stride = (7, 2, 4) if self.is_stem else (3, 1, 2)
      x = conv(self.embed_dim, (kernel, kernel), "proj", self.dtype, self.param_dtype, strides=(stride, stride),
               padding=[(pad, pad), (pad, pad)])(x)
    elif self.tubelet_size == 1:
      p = self.patch_size
      x = conv(self.embed_dim, (p, p), "proj", self.dtype, self.param_dtype, strides=(p, p), padding="VALID")(x)
    else:
      p, tb = self.patch_size, self.tubelet_size
      x = conv(self.embed_dim, (tb, p, p), "proj", self.dtype, self.param_dtype, strides=(tb, p, p),
               padding="VALID")(x)
      x = x.reshape((-1,) + x.shape[2:])
    return layer_norm("norm", self.dtype, self.layer_norm_impl)(x)


class BasicLayer(nn.Module):
  """One stage (`layers.i`): its blocks, then (not after the last stage) the downsample."""
  drop_paths: Sequence[float]
  downsample: bool
  block_kwargs: dict
  use_conv_embed: bool = False
  remat: bool = False
  remat_policy: str = "nothing"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    block_cls = VideoFocalNetBlock
    if self.remat:
      block_cls = nn.remat(VideoFocalNetBlock, static_argnums=(2,), policy=remat_policy(self.remat_policy))
    for j, rate in enumerate(self.drop_paths):
      x = block_cls(drop_path=rate, name=f"blocks_{j}", **self.block_kwargs)(x, train)
    if self.downsample:
      x = PatchEmbed(2 * x.shape[-1], 2, use_conv_embed=self.use_conv_embed,
                     layer_norm_impl=self.block_kwargs["modulation_kwargs"].get("layer_norm_impl", "flax"),
                     dtype=self.dtype, param_dtype=self.param_dtype, name="downsample")(x)
    return x


class VideoFocalNet(nn.Module):
  """Video-FocalNet classifier: `(B, T, H, W, 3)` normalised clips -> `(B, num_classes)` float32 logits.

  Fields carry the official constructor's names; `design`, `temporal_conv`,
  `depthwise_impl`, `temporal_layout`, `dense_init`, `dtype`, `param_dtype`, `remat`, `remat_policy`,
  `layer_norm_impl` and `focal_projection` are ours
  (implementation choices that leave the parameters and the result unchanged, but for `dense_init`).
  `dense_init='fan_in'` is for training from scratch (see
  `layers.dense_initializer`); it changes only the initial values.
  """
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  focal_levels: Sequence[int] = (2, 2, 2, 2)
  focal_windows: Sequence[int] = (3, 3, 3, 3)
  mlp_ratio: float = 4.0
  drop_rate: float = 0.0
  drop_path_rate: float = 0.1
  use_layerscale: bool = False
  layerscale_value: float = 1e-4
  use_postln: bool = False
  use_postln_in_modulation: bool = False
  normalize_modulator: bool = False
  num_frames: int = 8
  tubelet_size: int = 1
  patch_size: int = 4
  num_classes: int = 400
  use_conv_embed: bool = False
  design: str = "parallel"
  temporal_conv: str = "dense"
  depthwise_impl: str = "auto"
  temporal_layout: str = "auto"
  dense_init: str = "official"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  remat_policy: str = "nothing"
  layer_norm_impl: str = "flax"
  focal_projection: str = "fused"

  @nn.compact
  def __call__(self, video: jax.Array, train: bool = False) -> jax.Array:
    b, t, h, w, _ = video.shape
    if t != self.num_frames:
      raise ValueError(f"Clips have {t} frames but the model was built with num_frames={self.num_frames}.")
    if t % self.tubelet_size:
      raise ValueError(f"num_frames={t} is not divisible by tubelet_size={self.tubelet_size}.")
    if h % 32 or w % 32:
      raise ValueError(f"Frame size {h}x{w}: height and width must be divisible by 32.")
    if self.use_conv_embed and self.tubelet_size != 1:
      raise ValueError("use_conv_embed supports tubelet_size=1 only (as the released code).")
    if self.design not in DESIGNS:
      raise ValueError(f"design={self.design!r}: expected one of {DESIGNS}.")
    remat_policy(self.remat_policy)  # A bad name fails here, remat on or off.
    if self.layer_norm_impl not in layers.LAYER_NORM_IMPLS:
      raise ConfigError(f"model.layer_norm_impl={self.layer_norm_impl!r}: expected one of "
                        f"{', '.join(layers.LAYER_NORM_IMPLS)}.")
    if self.focal_projection not in FOCAL_PROJECTIONS:
      raise ConfigError(f"model.focal_projection={self.focal_projection!r}: expected one of "
                        f"{', '.join(FOCAL_PROJECTIONS)}.")
    frames = t // self.tubelet_size
    video = video.astype(self.dtype)
    x = video if self.tubelet_size > 1 else video.reshape(b * t, h, w, video.shape[-1])
    x = PatchEmbed(self.embed_dim, self.patch_size, self.tubelet_size, self.use_conv_embed, is_stem=True,
                   layer_norm_impl=self.layer_norm_impl, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="patch_embed")(x)
    x = nn.Dropout(self.drop_rate, deterministic=not train)(x)

    num_blocks = sum(self.depths)
    rates = [self.drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]
    dim = self.embed_dim
    for i, depth in enumerate(self.depths):
      modulation_kwargs = dict(
          focal_window=self.focal_windows[i], focal_level=self.focal_levels[i], num_frames=frames,
          use_postln_in_modulation=self.use_postln_in_modulation, normalize_modulator=self.normalize_modulator,
          design=self.design, temporal_conv=self.temporal_conv, depthwise_impl=self.depthwise_impl,
          temporal_layout=self.temporal_layout, dense_init=self.dense_init, layer_norm_impl=self.layer_norm_impl,
          focal_projection=self.focal_projection)
      x = BasicLayer(
          drop_paths=tuple(rates[sum(self.depths[:i]):sum(self.depths[:i + 1])]),
          downsample=i < len(self.depths) - 1,
          block_kwargs=dict(modulation_kwargs=modulation_kwargs, mlp_ratio=self.mlp_ratio, drop=self.drop_rate,
                            use_layerscale=self.use_layerscale, layerscale_value=self.layerscale_value,
                            use_postln=self.use_postln, dtype=self.dtype, param_dtype=self.param_dtype),
          use_conv_embed=self.use_conv_embed, remat=self.remat, remat_policy=self.remat_policy, dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=f"layers_{i}")(x, train)
      dim = x.shape[-1]
    x = layer_norm("norm", self.dtype, self.layer_norm_impl)(x)
    x = x.mean(axis=(1, 2)).reshape(b, frames, dim).mean(axis=1)
    logits = dense(self.num_classes, "head", self.dtype, self.param_dtype, init=self.dense_init)(x)
    return logits.astype(jnp.promote_types(self.dtype, jnp.float32))  # bf16 compute -> f32 logits
