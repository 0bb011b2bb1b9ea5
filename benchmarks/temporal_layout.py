"""The temporal branch's token layout on the local backend: 'regroup' (as released) vs 'frames' (in place).

    python benchmarks/temporal_layout.py [--batch=1] [--stage=0] [--rounds=7]

Times one temporal focal level of Video-FocalNet-T at 8x224 (stage 0: 56x56x96 tokens
per frame) as the model runs it: 'regroup' moves the tokens to (B*H*W, T, C), runs a
1-D conv and moves them back; 'frames' runs a (k, 1, 1) conv on (B, T, H, W, C). The
two are timed in alternation (median of --rounds) and printed as a ratio to 'regroup'.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vfocal_jax.models.layers import gelu  # noqa: E402


def _regroup(x, w, shape):
  b, t, h, wd, c = shape
  xt = x.reshape(shape).transpose(0, 2, 3, 1, 4).reshape(-1, t, c)
  k = w.shape[0]
  y = gelu(lax.conv_general_dilated(xt, w, (1,), [(k // 2, k // 2)], dimension_numbers=("NWC", "WIO", "NWC")))
  return y.reshape(b, h, wd, t, c).transpose(0, 3, 1, 2, 4).reshape(b * t, h, wd, c)


def _frames(x, w, shape):
  b, t, h, wd, c = shape
  k = w.shape[0]
  y = lax.conv_general_dilated(x.reshape(shape), w.reshape(k, 1, 1, c, c), (1, 1, 1), [(k // 2, k // 2), (0, 0), (0, 0)],
                               dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  return gelu(y).reshape(b * t, h, wd, c)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--stage", type=int, default=0)
  parser.add_argument("--rounds", type=int, default=7)
  args = parser.parse_args()
  t, side, c = 8, 56 >> args.stage, 96 << args.stage
  shape = (args.batch, t, side, side, c)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(args.batch * t, side, side, c)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, c, c)) / np.sqrt(3 * c), jnp.float32)
  variants = {"regroup": _regroup, "frames": _frames}
  fns = {}
  for name, f in variants.items():
    fwd = jax.jit(lambda x, w, f=f: f(x, w, shape))
    both = jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(f(x, w, shape) ** 2), argnums=(0, 1)))
    fns[name] = {"forward": fwd, "forward+backward": both}
  np.testing.assert_allclose(fns["regroup"]["forward"](x, w), fns["frames"]["forward"](x, w), rtol=1e-4, atol=1e-4)
  for kinds in fns.values():
    for f in kinds.values():
      jax.block_until_ready(f(x, w))
  times: dict[tuple[str, str], list[float]] = {}
  for _ in range(args.rounds):
    for name, kinds in fns.items():
      for kind, f in kinds.items():
        t0 = time.perf_counter()
        jax.block_until_ready(f(x, w))
        times.setdefault((kind, name), []).append(time.perf_counter() - t0)
  print(f"backend {jax.default_backend()}, tokens {shape}, float32, median of {args.rounds}")
  print("| pass | regroup (ms) | frames (ms) | frames / regroup |\n|---|---|---|---|")
  for kind in ("forward", "forward+backward"):
    r, f = np.median(times[(kind, "regroup")]), np.median(times[(kind, "frames")])
    print(f"| {kind} | {r * 1e3:.1f} | {f * 1e3:.1f} | {f / r:.2f} |")


if __name__ == "__main__":
  main()
