"""JAX vs PyTorch on this CPU: Video-FocalNet, float32, one clip, same weights.

    .venv/bin/python benchmarks/bench_vs_pytorch.py [--variant=tiny] [--rounds=7] [--blocks=1]
        [--frames=8] [--size=224] [--batch=1] [--threads=N] [--skip_train] [--no-malloc_thp]
        [--no-xla_sequential_scheduler]

What is timed (median of `--rounds` calls per framework and `--blocks` repeats;
compile and warm-up excluded):

* eval forward: `jax.jit(model.apply)(params, video, train=False)` vs
  `torch_model.eval()` forward under `torch.inference_mode()`;
* train step: one jitted step of cross-entropy + SGD (momentum 0.9) with
  donated params/optimizer state vs PyTorch `zero_grad(); loss.backward();
  opt.step()` with `torch.optim.SGD(momentum=0.9)`. Dropout and stochastic
  depth are 0 in both so both compute the same thing.

Methodology. Each framework is timed in its own block (JAX: all forward
rounds, then all train rounds; then PyTorch likewise), never call by call in
alternation: PyTorch's OpenMP worker threads keep spinning for a while after
each call (default wait policy, which is what PyTorch users get and is left
alone here), and in alternation that spin stole cores from the next JAX call
(train step 3.1 s alone, 5.1 s alternating). The process sleeps
`--settle_s` after every PyTorch block and after the PyTorch warm-up, so the
spin never overlaps a JAX timing; JAX's own threads idle passively. With
`--blocks=N` the pair (JAX block, PyTorch block) is repeated N times, so that
slow drifts of a shared machine hit both.

Memory allocation. XLA:CPU allocates each call's temporary buffer (4.4 GB for
the T train step) with glibc `malloc`, which mmaps it fresh and unmaps it
after every call: ~1 M page faults (4 KiB) per step, ~2 s of kernel time on 2
cores. By default the script re-executes itself with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35: malloc madvises its
mmapped chunks for transparent huge pages; the kernel's THP mode is usually
`madvise`), which cuts the faults 500x. It is a process-wide setting, so
PyTorch runs under it too; `--no-malloc_thp` measures without it. The same
variable helps any JAX-on-CPU training process (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1
python main.py ...`).

XLA flag. By default `--xla_cpu_enable_concurrency_optimized_scheduler=false`
is appended to `XLA_FLAGS` (unless `XLA_FLAGS` already names that flag): it only
changes the order in which XLA:CPU schedules the operations (not what they
compute), and on these 2 cores the train step ran ~4% faster with it (2.38 ->
2.28 s). `--no-xla_sequential_scheduler` measures XLA's default.

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
  parser.add_argument("--blocks", type=int, default=1, help="repeats of (JAX block, PyTorch block)")
  parser.add_argument("--settle_s", type=float, default=1.0,
                      help="sleep after each PyTorch block (its OpenMP threads spin on after a call)")
  parser.add_argument("--malloc_thp", action=argparse.BooleanOptionalAction, default=True,
                      help="re-exec with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (see the docstring)")
  parser.add_argument("--xla_sequential_scheduler", action=argparse.BooleanOptionalAction, default=True,
                      help="append --xla_cpu_enable_concurrency_optimized_scheduler=false to XLA_FLAGS")
  args = parser.parse_args()
  if args.malloc_thp and "glibc.malloc.hugetlb" not in os.environ.get("GLIBC_TUNABLES", ""):
    tunables = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), "glibc.malloc.hugetlb=1"]))
    os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, "GLIBC_TUNABLES": tunables})
  sched_flag = "xla_cpu_enable_concurrency_optimized_scheduler"
  if args.xla_sequential_scheduler and sched_flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), f"--{sched_flag}=false"]))

  import jax  # pylint: disable=import-outside-toplevel
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
  model = create_model(args.variant, num_classes=num_classes, num_frames=args.frames,
                       drop_path_rate=0.0, drop_rate=0.0)
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

  blocks = {
      "jax": {"jax_fwd": lambda: forward(params, video_j).block_until_ready()},
      "torch": {"torch_fwd": torch_forward},
  }
  if not args.skip_train:
    blocks["jax"]["jax_train"] = jax_train
    blocks["torch"]["torch_train"] = torch_train
  times: dict[str, list[float]] = {k: [] for calls in blocks.values() for k in calls}
  mem: dict[str, int] = {k: 0 for k in times}
  for _ in range(args.blocks):
    for framework, calls in blocks.items():
      for name, fn in calls.items():
        fn()  # warm-up (the first call after a switch of function or framework)
        for _ in range(args.rounds):
          dt, grow = time_call(fn)
          times[name].append(dt)
          mem[name] = max(mem[name], grow)
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

  print(f"\nVideo-FocalNet-{args.variant[0].upper()} float32, batch {args.batch}, "
        f"{args.frames}x{args.size}x{args.size}, median of {args.rounds} rounds x {args.blocks} block(s) "
        "per framework (JAX block, then PyTorch block)")
  print(f"machine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores "
        f"(shared with other work while measured); jax {jax.__version__} ({jax.default_backend()}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); "
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
    fj, ft = 2 * mult * macs / j / 1e9, 2 * mult * macs / t / 1e9
    print(f"{label:14s}{j:9.3f}{t:11.3f}{j / t:8.2f}{fj:13.0f}{ft:12.0f}{100 * fj / peak:11.0f}%"
          f"{mem[f'jax_{suffix}'] / 2 ** 30:9.2f}G{mem[f'torch_{suffix}'] / 2 ** 30:8.2f}G")
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * gib
  print(f"\npeak RSS of this process (both frameworks, params, compiled code): {rss:.2f} GiB; "
        "+RSS = growth of RSS during one call over the RSS before it")
  print("train step FLOPs counted as 3 x forward (backward ~ 2 x forward).")


if __name__ == "__main__":
  main()
