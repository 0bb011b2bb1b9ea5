"""Parameters and multiply-accumulates (GMACs) per view of a Video-FocalNet config.

Convention. The paper's "GFLOPs" are multiply-accumulates of one view (one
clip of `num_frames` x `image_size`^2), as counted by the released
`get_flops.py` with thop. We count them from the traced computation: every
`dot_general` (Dense, einsum) and every convolution in the model's jaxpr,
recursing into jit / remat / custom_vjp / scan sub-jaxprs, a convolution
counting its full kernel taps per output element (`out * C_in/groups * k...`)
as thop and fvcore do, zero padding included. The model is traced with
`depthwise_impl='xla'` so that depthwise convolutions appear as
convolutions (the shift implementation is element-wise multiplies).

thop also counts each affine LayerNorm as 4 operations per input element and
the final average pool; `thop_gmacs` adds those (LayerNorm counted by
intercepting the model's `nn.LayerNorm` calls), which is the figure the
released code prints (63.1 / 124.5 / 220.9 G for T / S / B). The matmul and
convolution MACs alone are 0.2% lower.

XLA's `cost_analysis()` flops of the compiled forward are printed beside, as
their own thing: it counts 2 flops per MAC, skips zero-padded taps, and
counts element-wise work (the exact-erf GELU is a polynomial, tens of flops
per element).

Nothing here allocates the model: shapes come from `jax.eval_shape` and the
jaxpr from `jax.make_jaxpr` on abstract values.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vfocal_jax import artifacts

__all__ = [
    "count_params", "count_macs", "count_jaxpr_macs", "count_layernorm_ops", "xla_flops",
    "summarize", "print_summary",
]

DEFAULT_IMAGE_SIZE = 224


def count_params(params: Any) -> int:
  """Number of scalars in a pytree of arrays or `ShapeDtypeStruct`s."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


def _video_spec(model: nn.Module, num_frames: int | None, image_size: int | None,
                batch: int = 1) -> jax.ShapeDtypeStruct:
  t = num_frames or getattr(model, "num_frames", 8)
  s = image_size or DEFAULT_IMAGE_SIZE
  return jax.ShapeDtypeStruct((batch, t, s, s, 3), jnp.float32)


def _sub_jaxprs(value: Any):
  if hasattr(value, "eqns"):
    yield value
  elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def _eqn_macs(eqn: Any) -> int:
  name = eqn.primitive.name
  if name == "dot_general":
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    contracted = math.prod(lhs_shape[d] for d in lhs_contract)
    return math.prod(eqn.outvars[0].aval.shape) * contracted
  if name == "conv_general_dilated":
    rhs_shape = eqn.invars[1].aval.shape
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    taps_times_cin = math.prod(rhs_shape) // rhs_shape[out_feature_dim]
    return math.prod(eqn.outvars[0].aval.shape) * taps_times_cin
  return 0


def count_jaxpr_macs(jaxpr: Any) -> int:
  """Multiply-accumulates of dot_general and convolutions in a (Closed)Jaxpr, recursively.

  `scan` bodies count `length` times, `cond` its most expensive branch,
  `while` bodies once (their trip count is unknown).
  """
  if hasattr(jaxpr, "jaxpr") and not hasattr(jaxpr, "eqns"):
    jaxpr = jaxpr.jaxpr
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    total += _eqn_macs(eqn)
    if name == "cond":
      total += max(count_jaxpr_macs(b) for b in eqn.params["branches"])
      continue
    inner = sum(count_jaxpr_macs(j) for key, v in eqn.params.items()
                if key != "cond_jaxpr" for j in _sub_jaxprs(v))
    if name == "scan":
      inner *= eqn.params["length"]
    total += inner
  return total


def _forward(model: nn.Module):
  return lambda params, video: model.apply({"params": params}, video, train=False)


def count_macs(model: nn.Module, params: Any, video: jax.ShapeDtypeStruct) -> int:
  """Multiply-accumulates of one forward pass (trace the model with `depthwise_impl='xla'`)."""
  return count_jaxpr_macs(jax.make_jaxpr(_forward(model))(params, video))


def count_layernorm_ops(model: nn.Module, params: Any, video: jax.ShapeDtypeStruct) -> int:
  """thop's LayerNorm count: 2 per input element, doubled when affine (scale or bias)."""
  total = 0

  def interceptor(next_fun, args, kwargs, context):
    nonlocal total
    module = context.module
    if isinstance(module, nn.LayerNorm) and context.method_name == "__call__":
      affine = module.use_scale or module.use_bias
      total += 2 * math.prod(args[0].shape) * (2 if affine else 1)
    return next_fun(*args, **kwargs)

  def traced(p, x):
    with nn.intercept_methods(interceptor):
      return _forward(model)(p, x)

  jax.make_jaxpr(traced)(params, video)
  return total


def xla_flops(model: nn.Module, params: Any, video: jax.ShapeDtypeStruct) -> float | None:
  """XLA's `cost_analysis()` flops of the compiled forward (compiles; no big allocation)."""
  compiled = jax.jit(_forward(model)).lower(params, video).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not isinstance(cost, Mapping) or "flops" not in cost:
    return None
  return float(cost["flops"])


def summarize(model_config: Any, num_frames: int | None = None, image_size: int | None = None,
              *, with_xla: bool = False) -> dict[str, Any]:
  """Params, MACs (matmul + conv), thop-convention ops and optionally XLA flops per view."""
  model = artifacts.model_from_fields(model_config, depthwise_impl="xla", dtype=jnp.float32,
                                     param_dtype=jnp.float32, remat=False)
  video = _video_spec(model, num_frames, image_size)
  params = artifacts.abstract_params(model, video.shape[1], video.shape[2])
  macs = count_macs(model, params, video)
  ln_ops = count_layernorm_ops(model, params, video)
  # thop's AdaptiveAvgPool1d of the last stage: (H*W + 1) * C per frame (tiny).
  stages = len(model.depths)
  side = video.shape[2] // (model.patch_size * 2 ** (stages - 1))
  frames = video.shape[1] // model.tubelet_size
  pool_ops = frames * (side * side + 1) * model.embed_dim * 2 ** (stages - 1)
  out = {
      "params": count_params(params),
      "macs": macs,
      "gmacs": macs / 1e9,
      "thop_gmacs": (macs + ln_ops + pool_ops) / 1e9,
      "layernorm_ops": ln_ops,
      "video_shape": tuple(video.shape),
  }
  if with_xla:
    flops = xla_flops(model, params, video)
    out["xla_gflops"] = None if flops is None else flops / 1e9
  return out


def _fmt(value: float) -> str:
  return f"{value:.2f}" if value >= 1 else f"{value:.4f}"


def print_summary(model_config: Any, num_frames: int | None = None,
                  image_size: int | None = None) -> dict[str, Any]:
  """Prints params and GMACs per view of `create_model(**model_config)`; returns the figures."""
  kwargs = artifacts.model_kwargs(model_config)
  s = summarize(kwargs, num_frames, image_size, with_xla=True)
  _, t, h, w, _ = s["video_shape"]
  print(f"Video-FocalNet {kwargs.get('variant', 'tiny')} "
        f"({', '.join(f'{k}={v}' for k, v in kwargs.items() if k != 'variant') or 'defaults'})")
  print(f"  view:                          {t} x {h} x {w} x 3 (batch 1; traced in float32, "
        "depthwise_impl='xla')")
  print(f"  parameters:                    {s['params']:,}")
  print(f"  GMACs (matmul + conv):         {_fmt(s['gmacs'])}   "
        "<- multiply-accumulates of dot_general/conv in the jaxpr, full kernel taps")
  print(f"  GMACs (thop, as get_flops.py): {_fmt(s['thop_gmacs'])}   "
        "<- + LayerNorm 4/elem + final pool: the paper's 'GFLOPs' convention")
  if s.get("xla_gflops") is not None:
    print(f"  XLA cost_analysis GFLOPs:      {_fmt(s['xla_gflops'])}   "
          "<- compiled forward, 2 per MAC, skips padded taps, counts element-wise work (erf GELU)")
  return s

