"""CPU time to compile the tests' tiny train state init and train step under several XLA_FLAGS.

    python benchmarks/compile_flags.py [--devices=8] [--rounds=2]

Each flag set runs in a fresh process with the persistent compilation cache
off, and reports the compile's CPU time (all threads) and the ratio to XLA's
defaults. tests/conftest.py picks the cheapest set: the test models are tiny,
so the suite's time is mostly XLA compiling them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAG_SETS = {
    "XLA defaults": "",
    "opt level 0": "--xla_backend_optimization_level=0",
    "no fusion emitters": "--xla_cpu_use_fusion_emitters=false",
    "opt level 0 + no fusion emitters": "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false",
}

_CHILD = r"""
import json, sys, time
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
import jax
jax.config.update("jax_enable_compilation_cache", False)
from helpers import global_batch, tiny_config
from vfocal_jax import sharding, train
config = tiny_config(mesh_shape=(1, 1) if jax.device_count() == 1 else (jax.device_count() // 2, 2))
trainer = train.Trainer(config, steps_per_epoch=100)
lowered_init = jax.jit(trainer._init, out_shardings=trainer.state_sharding).lower(jax.random.PRNGKey(0))
t0 = time.process_time(); lowered_init.compile(); t1 = time.process_time()
with trainer.mesh:
  lowered_step = trainer.train_step.lower(trainer.abstract_target(), trainer.put_batch(global_batch(0, config)))
  t2 = time.process_time(); lowered_step.compile(); t3 = time.process_time()
print(json.dumps({"init_s": t1 - t0, "step_s": t3 - t2}))
"""


def measure(flags: str, devices: int) -> dict[str, float]:
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
             TF_CPP_MIN_LOG_LEVEL="3")
  out = subprocess.run([sys.executable, "-c", _CHILD, ROOT], env=env, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=2, help="runs per flag set; the minimum is reported")
  args = parser.parse_args(argv)
  rows = []
  for name, flags in FLAG_SETS.items():
    runs = [measure(flags, args.devices) for _ in range(args.rounds)]
    rows.append({"flags": name, "init_s": min(r["init_s"] for r in runs), "step_s": min(r["step_s"] for r in runs)})
  base = rows[0]
  print(f"tiny train state init + train step, {args.devices} CPU devices, compile CPU seconds (min of {args.rounds})")
  print(f"{'XLA_FLAGS':34s} {'init':>6s} {'x':>5s} {'step':>6s} {'x':>5s}")
  for r in rows:
    print(f"{r['flags']:34s} {r['init_s']:6.1f} {r['init_s'] / base['init_s']:5.2f} "
          f"{r['step_s']:6.1f} {r['step_s'] / base['step_s']:5.2f}")
  return rows


if __name__ == "__main__":
  main()
