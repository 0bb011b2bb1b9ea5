"""Building blocks shared by the Video-FocalNet designs.

PyTorch conventions that decide parity live here: LayerNorm eps 1e-5, the
exact (erf) GELU, kaiming-uniform(a=sqrt 5) conv init, truncated-normal(0.02)
Dense init.
"""
from __future__ import annotations

import functools
import itertools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any

# torch's Conv default: kaiming_uniform(a=sqrt(5)) == uniform(+-1/sqrt(fan_in)).
conv_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
dense_kernel_init = nn.initializers.truncated_normal(stddev=0.02)
DENSE_INITS = ("official", "fan_in")


def dense_initializer(scheme: str) -> nn.initializers.Initializer:
  """'official': truncated normal, std 0.02 (timm's `trunc_normal_`, as released).

  'fan_in': truncated normal, std 1/sqrt(fan_in) (LeCun). For training from
  scratch: with std 0.02 the modulator product q * m_s * m_t starts at ~1e-7
  and its gradients at ~1e-8, so the temporal branch never starts learning
  (the released models start from ImageNet weights instead).
  """
  if scheme == "official":
    return dense_kernel_init
  if scheme == "fan_in":
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
  raise ValueError(f"dense_init={scheme!r}: expected one of {DENSE_INITS}.")


_SQRT_HALF = 0.7071067811865476     # 1 / sqrt(2)
_INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """Exact erf GELU, x * Phi(x), in PyTorch's form `0.5 * x * (1 + erf(x / sqrt 2))` (Flax defaults to tanh).

  Its VJP keeps only `x` and recomputes Phi(x) + x * phi(x) inside the backward pass: autodiff of
  `jax.nn.gelu` stores an erfc and an exp array per call and evaluates the branchy erfc.
  """
  return 0.5 * x * (1.0 + lax.erf(x * _SQRT_HALF))


def _gelu_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  return gelu(x), x


def _gelu_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
  cdf = 0.5 * (1.0 + lax.erf(x * _SQRT_HALF))
  pdf = jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI
  return (g * (cdf + x * pdf),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


LAYER_NORM_IMPLS = ("flax", "recompute")


def layer_norm(name: str, dtype: Dtype, impl: str = "flax") -> nn.Module:
  """LayerNorm over the last axis, eps 1e-5, params `scale`/`bias` (nn.LayerNorm's names, shapes and init).

  `impl='flax'`: `nn.LayerNorm`. `'recompute'`: the same forward, op for op (the same numbers), with a
  VJP that keeps only the input and the per-token mean and 1/std and recomputes the normalised input in
  the backward pass; autodiff of nn.LayerNorm keeps three float32 copies of the input (x^2, x - mean,
  the normalised x). The gradients agree to rounding (the textbook formula for the mean/variance path).
  """
  if impl == "flax":
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, name=name)
  if impl == "recompute":
    return RecomputeLayerNorm(epsilon=1e-5, dtype=dtype, name=name)
  raise ValueError(f"layer_norm_impl={impl!r}: expected one of {LAYER_NORM_IMPLS}.")


def _ln_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """flax's `_compute_stats` (fast variance, float32 or wider): mean and variance over the last axis."""
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mu, mu2 = xf.mean(-1), lax.square(xf).mean(-1)
  return mu, jnp.maximum(0.0, mu2 - lax.square(mu))


def _ln_forward(x, scale, bias, epsilon, dtype):
  """flax's `_normalize`, op for op; returns the output and the residuals (x, mean, 1/std)."""
  mu, var = _ln_stats(x)
  mean = mu[..., None]
  y = x - mean
  rstd = lax.rsqrt(var[..., None] + epsilon)
  y = y * (rstd * scale)
  y = y + bias
  return jnp.asarray(y, dtype), (x, mean, rstd, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm_recompute(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype: Any) -> jax.Array:
  return _ln_forward(x, scale, bias, epsilon, dtype)[0]


def _ln_fwd(x, scale, bias, epsilon, dtype):
  y, (x, mean, rstd, scale) = _ln_forward(x, scale, bias, epsilon, dtype)
  return y, (x, mean, rstd, scale, bias)


def _ln_bwd(epsilon, dtype, res, g):
  x, mean, rstd, scale, bias = res
  acc = mean.dtype
  xhat = (x.astype(acc) - mean) * rstd
  g = g.astype(acc)
  axes = tuple(range(x.ndim - 1))
  dbias = jnp.sum(g, axes)
  dscale = jnp.sum(g * xhat, axes)
  gx = g * scale
  dx = rstd * (gx - gx.mean(-1, keepdims=True) - xhat * (gx * xhat).mean(-1, keepdims=True))
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


layer_norm_recompute.defvjp(_ln_fwd, _ln_bwd)


class RecomputeLayerNorm(nn.Module):
  """`nn.LayerNorm(epsilon, dtype)` (last axis, scale and bias) with `layer_norm_recompute`'s lean VJP."""
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    # nn.LayerNorm's output dtype: `dtype`, else the promotion of x and the params.
    dtype = self.dtype if self.dtype is not None else jnp.result_type(x, scale, bias)
    return layer_norm_recompute(x, scale, bias, self.epsilon, jnp.dtype(dtype))


def resolve_depthwise_impl(impl: str, *, platform: str | None = None, model_axis: int = 1) -> str:
  """'auto' -> 'shift' on CPU (XLA:CPU grouped convs are ~10x slower) or on a mesh whose 'model' axis is > 1, else 'xla'.

  With a 'model' axis > 1, XLA's kernel gradient of the sharded grouped convolution comes out multiplied by
  that axis size (jax 0.10.2, docs/design.md); the shifted multiplies are right everywhere.
  ``platform`` defaults to JAX's default backend.
  """
  if impl == "auto":
    platform = jax.default_backend() if platform is None else platform
    return "shift" if platform == "cpu" or model_axis > 1 else "xla"
  if impl not in ("xla", "shift"):
    raise ValueError(f"depthwise_impl={impl!r}: expected 'auto', 'xla' or 'shift'.")
  return impl


def _same_pads(kernel_size: Sequence[int]) -> list[tuple[int, int]]:
  return [(k // 2, k - 1 - k // 2) for k in kernel_size]


def _windows(xp: jax.Array, kernel_size: Sequence[int], sizes: Sequence[int]):
  """(tap, xp's window at that tap) for every tap of a kernel, `xp` padded (N, *S, C)."""
  for tap in itertools.product(*(range(k) for k in kernel_size)):
    yield tap, xp[(slice(None),) + tuple(slice(t, t + s) for t, s in zip(tap, sizes))]


def _shifted_sum(x: jax.Array, w: jax.Array, pads: Sequence[tuple[int, int]]) -> jax.Array:
  """sum over taps t of pad(x)[window t] * w[t]: `x` (N, *S, C), `w` (*K, C) in x's dtype."""
  xp = jnp.pad(x, [(0, 0)] + list(pads) + [(0, 0)])
  out = None
  for tap, window in _windows(xp, w.shape[:-1], x.shape[1:-1]):
    term = window * w[tap]
    out = term if out is None else out + term
  return out


@jax.custom_vjp
def shift_depthwise_conv(x: jax.Array, w: jax.Array) -> jax.Array:
  """Same-padded depthwise conv of `x` (N, *S, C) with `w` (*K, C) as a sum of shifted multiplies.

  The VJP keeps only `x` and `w`: autodiff of the sum would store every shifted window (k**2
  copies of `x`) for the kernel gradient. The input gradient is the same shifted sum of the
  cotangent with the flipped kernel (one fused pass); the kernel gradient is one reduction per
  tap, accumulated in at least float32 and returned in `w`'s dtype.
  """
  return _shifted_sum(x, w.astype(x.dtype), _same_pads(w.shape[:-1]))


def _shift_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  return shift_depthwise_conv(x, w), (x, w)


def _shift_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
  x, w = res
  kernel_size = w.shape[:-1]
  pads = _same_pads(kernel_size)
  flipped = w[tuple(slice(None, None, -1) for _ in kernel_size)].astype(g.dtype)
  dx = _shifted_sum(g, flipped, [(hi, lo) for lo, hi in pads])
  xp = jnp.pad(x, [(0, 0)] + pads + [(0, 0)])
  acc = jnp.promote_types(x.dtype, jnp.float32)
  axes = tuple(range(x.ndim - 1))
  dw = jnp.stack([jnp.sum(window * g, axis=axes, dtype=acc) for _, window in _windows(xp, kernel_size, x.shape[1:-1])])
  return dx.astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


shift_depthwise_conv.defvjp(_shift_fwd, _shift_bwd)


def depthwise_conv(x: jax.Array, kernel: jax.Array, impl: str) -> jax.Array:
  """Same-padded, stride-1 depthwise conv over the middle axes of `x` (N, *S, C).

  `kernel` has the Flax grouped-conv layout (*K, 1, C). 'shift' computes the
  sum over taps of shifted inputs times per-channel weights: fast on CPU, and
  its kernel gradient stays right under any sharding (docs/design.md).
  """
  spatial = kernel.shape[:-2]
  if impl == "xla":
    dims = "".join("DHW"[-len(spatial):])
    return lax.conv_general_dilated(
        x, kernel.astype(x.dtype), (1,) * len(spatial), _same_pads(spatial),
        dimension_numbers=(f"N{dims}C", f"{dims}IO", f"N{dims}C"),
        feature_group_count=x.shape[-1])
  return shift_depthwise_conv(x, kernel[..., 0, :])


class DepthwiseConv(nn.Module):
  """Depthwise conv, no bias, with the implementation switch (kernel named as nn.Conv's)."""
  kernel_size: tuple[int, ...]
  impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", conv_kernel_init, (*self.kernel_size, 1, x.shape[-1]), self.param_dtype)
    return depthwise_conv(x.astype(self.dtype), kernel, resolve_depthwise_impl(self.impl))


TEMPORAL_LAYOUTS = ("auto", "regroup", "frames")


def resolve_temporal_layout(layout: str) -> str:
  """'auto' -> 'regroup'; where the temporal branch's tokens live, the result being the same.

  'regroup' (the released code's) moves tokens to `(B*H*W, T, C)` and back around the
  temporal branch; 'frames' keeps them `(B, T, H, W, C)` and convolves along T in place.
  XLA:CPU runs the regrouped 1-D conv 2-4x faster than the in-place one, transposes
  included (benchmarks/temporal_layout.py); on TPU 'frames' moved 5% fewer bytes in eval
  and 4% more in training (docs/plan.md), so 'auto' is 'regroup' everywhere.
  """
  if layout == "auto":
    return "regroup"
  if layout not in TEMPORAL_LAYOUTS:
    raise ValueError(f"temporal_layout={layout!r}: expected one of {TEMPORAL_LAYOUTS}.")
  return layout


class TemporalConv(nn.Module):
  """Same-padded conv over axis 1 (time) of `(N, T, C)` or `(N, T, H, W, C)` tokens.

  The kernel is `nn.Conv`'s 1-D layout, `(k, C, features)` (dense, as released) or
  `(k, 1, C)` (depthwise), with the same names and init, whatever the layout: on
  `(N, T, H, W, C)` it runs as a `(k, 1, 1)` convolution over `(T, H, W)`.
  """
  features: int
  kernel_size: int
  depthwise: bool = False
  impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, c, extra = self.kernel_size, x.shape[-1], (1,) * (x.ndim - 3)
    x = x.astype(self.dtype)
    if self.depthwise:
      kernel = self.param("kernel", conv_kernel_init, (k, 1, c), self.param_dtype)
      return depthwise_conv(x, kernel.reshape((k,) + extra + (1, c)), resolve_depthwise_impl(self.impl))
    kernel = self.param("kernel", conv_kernel_init, (k, c, self.features), self.param_dtype)
    dims = "DHW"[:x.ndim - 2]
    return lax.conv_general_dilated(
        x, kernel.reshape((k,) + extra + (c, self.features)).astype(self.dtype), (1,) * (x.ndim - 2),
        [(k // 2, k // 2)] + [(0, 0)] * len(extra), dimension_numbers=(f"N{dims}C", f"{dims}IO", f"N{dims}C"))


def dense(features: int, name: str, dtype: Dtype, param_dtype: Dtype, use_bias: bool = True,
          init: str = "official") -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=dense_initializer(init), name=name)


class DenseParams(nn.Module):
  """The kernel and bias `dense(features, ...)` creates (same names, shapes, init), returned unused."""
  features: int
  init: str = "official"
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
    return (self.param("kernel", dense_initializer(self.init), (in_features, self.features), self.param_dtype),
            self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype))


def conv(features: int, kernel_size: Sequence[int], name: str, dtype: Dtype, param_dtype: Dtype,
         strides: Sequence[int] | None = None, padding: Any = "SAME", use_bias: bool = True) -> nn.Conv:
  return nn.Conv(features, tuple(kernel_size), strides=strides, padding=padding, use_bias=use_bias,
                 dtype=dtype, param_dtype=param_dtype, kernel_init=conv_kernel_init, name=name)


class PointwiseConv(nn.Module):
  """A 1x1 `nn.Conv` (kernel `(1,)*ndim + (C_in, C_out)`, bias, torch init) computed as one matmul.

  Same parameter names, shapes, init and result as `conv(features, (1,)*ndim, ...)`; on
  XLA:CPU a 1x1 convolution costs about twice the matmul in forward+backward.
  """
  features: int
  ndim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    kernel = self.param("kernel", conv_kernel_init, (1,) * self.ndim + (c, self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    x = x.astype(self.dtype)
    y = lax.dot_general(x, kernel.reshape(c, self.features).astype(self.dtype), (((x.ndim - 1,), (0,)), ((), ())))
    return y + bias.astype(self.dtype)


drop_path = functools.partial(nn.Dropout, broadcast_dims=(1, 2, 3))
"""Stochastic depth on (B*T', H, W, C): whole frames (rows) are dropped."""
