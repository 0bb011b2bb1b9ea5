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


def gelu(x: jax.Array) -> jax.Array:
  """Exact erf GELU (PyTorch's nn.GELU default; Flax defaults to tanh)."""
  return jax.nn.gelu(x, approximate=False)


def layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-5, dtype=dtype, name=name)


def resolve_depthwise_impl(impl: str) -> str:
  """'auto' -> 'shift' on CPU (XLA:CPU grouped convs are ~10x slower), else 'xla'."""
  if impl == "auto":
    return "shift" if jax.default_backend() == "cpu" else "xla"
  if impl not in ("xla", "shift"):
    raise ValueError(f"depthwise_impl={impl!r}: expected 'auto', 'xla' or 'shift'.")
  return impl


def depthwise_conv(x: jax.Array, kernel: jax.Array, impl: str) -> jax.Array:
  """Same-padded, stride-1 depthwise conv over the middle axes of `x` (N, *S, C).

  `kernel` has the Flax grouped-conv layout (*K, 1, C). 'shift' computes the
  sum over taps of shifted inputs times per-channel weights: fast on CPU, and
  its kernel gradient stays right under any sharding (STACK.md).
  """
  spatial = kernel.shape[:-2]
  pads = [(k // 2, k - 1 - k // 2) for k in spatial]
  if impl == "xla":
    dims = "".join("DHW"[-len(spatial):])
    return lax.conv_general_dilated(
        x, kernel.astype(x.dtype), (1,) * len(spatial), pads,
        dimension_numbers=(f"N{dims}C", f"{dims}IO", f"N{dims}C"),
        feature_group_count=x.shape[-1])
  xp = jnp.pad(x, [(0, 0)] + pads + [(0, 0)])
  out = jnp.zeros_like(x)
  w = kernel[..., 0, :].astype(x.dtype)
  sizes = x.shape[1:-1]
  for tap in itertools.product(*(range(k) for k in spatial)):
    window = xp[(slice(None),) + tuple(slice(t, t + s) for t, s in zip(tap, sizes))]
    out = out + window * w[tap]
  return out


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


def dense(features: int, name: str, dtype: Dtype, param_dtype: Dtype, use_bias: bool = True,
          init: str = "official") -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=dense_initializer(init), name=name)


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
