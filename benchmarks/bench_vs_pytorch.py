"""JAX vs PyTorch on this CPU: Video-FocalNet, float32, one clip, same weights.

    .venv/bin/python benchmarks/bench_vs_pytorch.py [--variant=tiny] [--rounds=7] [--order=pairs|blocks]
        [--blocks=1] [--frames=8] [--size=224] [--batch=1] [--threads=N] [--skip_train]
        [--model=focal_projection=split_spatial ...]
        [--no-malloc_thp] [--no-malloc_keep] [--no-sync_dispatch]

What is timed (compile and warm-up excluded):

* eval forward: `jax.jit(model.apply)(params, video, train=False)` vs
  `torch_model.eval()` forward under `torch.inference_mode()`;
* train step: one jitted step of cross-entropy + SGD (momentum 0.9) with
  donated params/optimizer state vs PyTorch `zero_grad(); loss.backward();
  opt.step()` with `torch.optim.SGD(momentum=0.9)`. Dropout and stochastic
  depth are 0 in both so both compute the same thing.

Methodology. The cores are shared with other virtual machines and their speed
drifts by 10-20% over minutes, so by default (`--order=pairs`) the calls
alternate, JAX then PyTorch, `--rounds` times, and JAX/PT is the median of the
per-pair ratios: a drift hits both halves of a pair alike. The process sleeps
`--settle_s` after every timed call: PyTorch's OpenMP worker threads keep
spinning for a while after each call (default wait policy, which is what
PyTorch users get and is left alone here), and without the pause that spin
stole cores from the next JAX call (train step 3.1 s alone, 5.1 s right after
a PyTorch call). JAX's own threads idle passively. `--order=blocks` times all
rounds of one framework, then the other (`--blocks=N` repeats the pair of
blocks), and prints the ratio of the medians.

Memory allocation (process-wide, so PyTorch runs under the same settings).
XLA:CPU allocates each call's temporary buffer (2.25 GB for the T train step)
with glibc `malloc`, on the thread that runs the computation; glibc serves a
request that large from a fresh `mmap` and unmaps it on `free`, so every step
page-faults the whole buffer in again and the kernel zeroes it: ~550 K faults
(4 KiB) per step, 0.8-1.2 s of kernel time on 2 cores. The script re-executes
itself with `GLIBC_TUNABLES` set:
  - `glibc.malloc.hugetlb=1` (`--malloc_thp`; glibc >= 2.35): malloc madvises
    its chunks for transparent huge pages; 500x fewer faults, but the kernel
    still zeroes 2.25 GB per step (0.4-0.9 s of system time);
  - `glibc.malloc.mmap_max=0` and a 1 TiB `trim_threshold` (`--malloc_keep`):
    large chunks come from the heap and stay mapped after `free`, so the next
    step reuses the same pages; no faults and no zeroing. glibc still mmaps
    requests over 64 MB made on a thread with its own arena (XLA's worker
    threads), hence `--sync_dispatch`: `jax_cpu_enable_async_dispatch=False`
    runs each XLA:CPU call on the calling (main) thread, whose arena is the
    heap. The benchmark blocks on every call anyway, so only where the buffer
    comes from changes. Measured alone (JAX train step, 2 runs each):
    3.97-4.13 s with THP only, 3.33-3.55 s with THP + keep + sync, system
    time per step 0.8 s -> 0.005 s.
The same variables help any JAX-on-CPU training process (see docs/usage.md).

The PyTorch model is `benchmarks/torch_video_focalnet.py` (official layout);
its random weights are converted with `vfocal_jax.convert` and the logits are
compared before timing.

Also printed: peak RSS of the process (`ru_maxrss`: both frameworks together),
the RSS growth of each timed call over the RSS before it (sampled every 2 ms),
and the achieved GFLOP/s = 2 x MACs / time (MACs of matmuls and convolutions
from `vfocal_jax.summary`; a train step counted as 3x the forward) against the
float32 peak of these cores = cores x GHz x FMA units x 16 lanes x 2, read from
/proc/cpuinfo (AVX-512 with AMX: Sapphire Rapids or later, 2 FMA units per
core; AMX does not do float32).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import re
import resource
import statistics
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def cpu_peak_gflops() -> tuple[float, str]:
  """float32 peak of the visible cores from /proc/cpuinfo, and how it was computed."""
  text = pathlib.Path("/proc/cpuinfo").read_text() if os.path.exists("/proc/cpuinfo") else ""
  model = re.search(r"model name\s*:\s*(.*)", text)
  mhz = re.search(r"cpu MHz\s*:\s*([\d.]+)", text)
  flag_line = re.search(r"flags\s*:\s*(.*)", text)
  flags = set(flag_line.group(1).split()) if flag_line else set()
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  ghz = float(mhz.group(1)) / 1000 if mhz else float("nan")
  if "avx512f" in flags:
    lanes, isa = 16, "AVX-512"
  elif "avx2" in flags:
    lanes, isa = 8, "AVX2"
  else:
    lanes, isa = 4, "SSE"
  fma_units = 2 if ("amx_tile" in flags or isa == "AVX2") else 1
  peak = cores * ghz * fma_units * lanes * 2
  how = (f"{cores} cores x {ghz:.2f} GHz (cpuinfo 'cpu MHz'; turbo not counted) x {fma_units} FMA "
         f"units x {lanes} float32 lanes ({isa}) x 2 flops/FMA = {peak:.0f} GFLOP/s  "
         f"[{model.group(1).strip() if model else '?'}; amx={'amx_tile' in flags}]")
  return peak, how


class RssSampler:
  """Samples this process's resident set size in a thread; `peak_since(mark)`."""

  def __init__(self, interval_s: float = 0.002):
    self._interval = interval_s
    self._page = os.sysconf("SC_PAGE_SIZE")
    self._peak = self.current()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def current(self) -> int:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * self._page

  def _run(self) -> None:
    while not self._stop.is_set():
      self._peak = max(self._peak, self.current())
      time.sleep(self._interval)

  def reset(self) -> int:
    self._peak = base = self.current()
    return base

  def peak(self) -> int:
    return max(self._peak, self.current())

  def close(self) -> None:
    self._stop.set()
    self._thread.join()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="tiny")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--frames", type=int, default=8)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
  parser.add_argument("--skip_train", action="store_true")
  parser.add_argument("--model", action="append", default=[], metavar="FIELD=VALUE",
                      help="a VideoFocalNet option for the JAX model (focal_projection=split_spatial, "
                      "layer_norm_impl=recompute, remat=True, ...); repeatable")
  parser.add_argument("--order", choices=("pairs", "blocks"), default="pairs",
                      help="pairs: JAX call, PyTorch call, ... (per-pair ratios); blocks: all rounds of one, then the other")
  parser.add_argument("--blocks", type=int, default=1, help="--order=blocks: repeats of (JAX block, PyTorch block)")
  parser.add_argument("--settle_s", type=float, default=1.0,
                      help="sleep after each timed call (pairs) or PyTorch block (its OpenMP threads spin on)")
  parser.add_argument("--malloc_thp", action=argparse.BooleanOptionalAction, default=True,
                      help="re-exec with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (see the docstring)")
  parser.add_argument("--malloc_keep", action=argparse.BooleanOptionalAction, default=True,
                      help="re-exec with glibc.malloc.mmap_max=0 and a 1 TiB trim_threshold (see the docstring)")
  parser.add_argument("--sync_dispatch", action=argparse.BooleanOptionalAction, default=True,
                      help="jax_cpu_enable_async_dispatch=False: XLA:CPU runs (and allocates) on the calling thread")
  args = parser.parse_args()
  wanted = (["glibc.malloc.hugetlb=1"] if args.malloc_thp else []) + (
      ["glibc.malloc.mmap_max=0", f"glibc.malloc.trim_threshold={2 ** 40}"] if args.malloc_keep else [])
  have = os.environ.get("GLIBC_TUNABLES", "")
  missing = [t for t in wanted if t.split("=")[0] not in have]
  if missing:
    tunables = ":".join(filter(None, [have] + missing))
    os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, "GLIBC_TUNABLES": tunables})

  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_cpu_enable_async_dispatch", not args.sync_dispatch)
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  from benchmarks import torch_video_focalnet as tvf  # pylint: disable=import-outside-toplevel
  from vfocal_jax import summary  # pylint: disable=import-outside-toplevel
  from vfocal_jax.convert import torch_to_flax  # pylint: disable=import-outside-toplevel
  from vfocal_jax.models import create_model  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
  load_before = os.getloadavg()
  sampler = RssSampler()
  num_classes = 400
  options = {k: {"True": True, "False": False}.get(v, v) for k, v in (o.split("=", 1) for o in args.model)}
  model = create_model(args.variant, num_classes=num_classes, num_frames=args.frames,
                       drop_path_rate=0.0, drop_rate=0.0, **options)
  dims = {"tiny": (96, (2, 2, 6, 2)), "small": (96, (2, 2, 18, 2)), "base": (128, (2, 2, 18, 2))}
  embed_dim, depths = dims[args.variant]
  torch.manual_seed(0)
  tmodel = tvf.VideoFocalNet(embed_dim=embed_dim, depths=depths, num_frames=args.frames,
                             num_classes=num_classes, drop_path_rate=0.0)  # PyTorch default init
  state_dict = {k: v.detach().numpy().copy() for k, v in tmodel.state_dict().items()}
  variables = torch_to_flax(state_dict, model)
  params = jax.tree.map(jnp.asarray, variables["params"])

  rng = np.random.default_rng(0)
  video = rng.standard_normal((args.batch, args.frames, args.size, args.size, 3)).astype(np.float32)
  labels = rng.integers(0, num_classes, size=args.batch)
  video_j = jnp.asarray(video)
  labels_j = jnp.asarray(labels)
  video_t = torch.from_numpy(np.ascontiguousarray(video.transpose(0, 1, 4, 2, 3)))
  labels_t = torch.from_numpy(labels)

  # --- JAX functions.
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
  tx = optax.sgd(1e-3, momentum=0.9)

  def loss_fn(p, x, y, key):
    logits = model.apply({"params": p}, x, train=True, rngs={"dropout": key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit(donate_argnums=(0, 1))
  def train_step(p, opt_state, x, y, key):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y, key)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  # --- PyTorch functions.
  topt = torch.optim.SGD(tmodel.parameters(), lr=1e-3, momentum=0.9)
  loss_t = torch.nn.CrossEntropyLoss()

  def torch_forward():
    tmodel.eval()
    with torch.inference_mode():
      return tmodel(video_t)

  def torch_train():
    tmodel.train()
    topt.zero_grad(set_to_none=True)
    loss = loss_t(tmodel(video_t), labels_t)
    loss.backward()
    topt.step()
    return loss

  # --- Check both compute the same thing, compile, warm up (PyTorch first, then let its threads settle).
  logits_t = torch_forward().numpy()
  if not args.skip_train:
    torch_train()
  torch_forward()
  time.sleep(args.settle_s)
  t0 = time.perf_counter()
  logits_j = np.asarray(forward(params, video_j))
  compile_fwd = time.perf_counter() - t0
  diff = float(np.max(np.abs(logits_j - logits_t)))
  scale = float(np.max(np.abs(logits_t)))
  # The train step donates its own copy of the params (PyTorch updates in place).
  train_params = jax.tree.map(jnp.copy, params)
  state = [train_params, tx.init(train_params)]
  key = jax.random.key(0)

  def jax_train():
    state[0], state[1], loss = train_step(state[0], state[1], video_j, labels_j, key)
    return jax.block_until_ready(loss)

  compile_train = float("nan")
  if not args.skip_train:
    t0 = time.perf_counter()
    jax_train()
    compile_train = time.perf_counter() - t0

  def time_call(fn) -> tuple[float, int]:
    base = sampler.reset()
    t = time.perf_counter()
    fn()
    dt = time.perf_counter() - t
    return dt, sampler.peak() - base

  calls = {"fwd": (lambda: forward(params, video_j).block_until_ready(), torch_forward)}
  if not args.skip_train:
    calls["train"] = (jax_train, torch_train)
  times: dict[str, list[float]] = {f"{fw}_{k}": [] for k in calls for fw in ("jax", "torch")}
  mem: dict[str, int] = {k: 0 for k in times}
  ratios: dict[str, list[float]] = {k: [] for k in calls}

  def timed(name: str, fn) -> float:
    dt, grow = time_call(fn)
    times[name].append(dt)
    mem[name] = max(mem[name], grow)
    return dt

  if args.order == "pairs":
    for suffix, (jax_fn, torch_fn) in calls.items():
      jax_fn()
      torch_fn()  # warm-up of this pair
      time.sleep(args.settle_s)
      for _ in range(args.rounds):
        dt_jax = timed(f"jax_{suffix}", jax_fn)
        time.sleep(args.settle_s)
        ratios[suffix].append(dt_jax / timed(f"torch_{suffix}", torch_fn))
        time.sleep(args.settle_s)
  else:
    for _ in range(args.blocks):
      for framework, index in (("jax", 0), ("torch", 1)):
        for suffix, pair in calls.items():
          pair[index]()  # warm-up (the first call after a switch of function or framework)
          for _ in range(args.rounds):
            timed(f"{framework}_{suffix}", pair[index])
        if framework == "torch":
          time.sleep(args.settle_s)
  sampler.close()

  macs = summary.count_macs(
      create_model(args.variant, num_classes=num_classes, num_frames=args.frames, depthwise_impl="xla"),
      jax.eval_shape(lambda: params),
      jax.ShapeDtypeStruct(video.shape, jnp.float32))
  peak, how = cpu_peak_gflops()
  med = {k: statistics.median(v) for k, v in times.items()}
  gib = 1 / 2 ** 20  # ru_maxrss is KiB on Linux

  order = ("calls in alternation (JAX, PyTorch), JAX/PT = median of the per-pair ratios"
           if args.order == "pairs" else f"x {args.blocks} block(s) per framework (JAX block, then PyTorch block)")
  print(f"\nVideo-FocalNet-{args.variant[0].upper()} float32, batch {args.batch}, "
        f"{args.frames}x{args.size}x{args.size}, median of {args.rounds} rounds, {order}")
  print(f"machine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores "
        f"(shared with other work while measured); jax {jax.__version__} ({jax.default_backend()}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"jax_cpu_enable_async_dispatch={not args.sync_dispatch}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
  print(f"load average (1 min) before / after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f} "
        "(above ~0 means other work shared the cores; PyTorch's OpenMP barriers suffer most)")
  print(f"logits max |jax - torch| = {diff:.2e} (max |logit| {scale:.2f}); "
        f"compile: forward {compile_fwd:.1f} s, train step {compile_train:.1f} s")
  print(f"forward MACs {macs / 1e9:.2f} G (matmul + conv); peak: {how}\n")
  header = f"{'':14s}{'JAX s':>9s}{'PyTorch s':>11s}{'JAX/PT':>8s}{'JAX GFLOP/s':>13s}" \
           f"{'PT GFLOP/s':>12s}{'JAX % peak':>12s}{'+RSS JAX':>10s}{'+RSS PT':>9s}"
  print(header)
  rows = [("eval forward", "fwd", 1)] + ([] if args.skip_train else [("train step", "train", 3)])
  for label, suffix, mult in rows:
    j, t = med[f"jax_{suffix}"], med[f"torch_{suffix}"]
    ratio = statistics.median(ratios[suffix]) if ratios[suffix] else j / t
    fj, ft = 2 * mult * macs / j / 1e9, 2 * mult * macs / t / 1e9
    print(f"{label:14s}{j:9.3f}{t:11.3f}{ratio:8.2f}{fj:13.0f}{ft:12.0f}{100 * fj / peak:11.0f}%"
          f"{mem[f'jax_{suffix}'] / 2 ** 30:9.2f}G{mem[f'torch_{suffix}'] / 2 ** 30:8.2f}G")
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * gib
  print(f"\npeak RSS of this process (both frameworks, params, compiled code): {rss:.2f} GiB; "
        "+RSS = growth of RSS during one call over the RSS before it")
  for suffix, values in ratios.items():
    if values:
      print(f"JAX/PT per pair, {suffix}: " + " ".join(f"{v:.2f}" for v in values))
  print("train step FLOPs counted as 3 x forward (backward ~ 2 x forward).")


if __name__ == "__main__":
  main()
