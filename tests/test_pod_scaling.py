"""Weak scaling: a tiny config's train step compiled for v5e:2x2 and v5e:4x4 (libtpu's compile-only devices).

With the same batch per chip, mixup and CutMix on and two micro-batches per
update, the only collectives are all-reduces (the gradients and the metrics),
none as large as one chip's video, and each chip sends the same bytes on 4
chips as on 16. Mixup over the global batch all-gathered the video batch
onto every chip (4x larger on 4x4).
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from vfocal_jax import plan, tpu_specs  # noqa: E402

CLIPS_PER_CHIP = 2  # Per micro-batch.
ACCUM = 2


def tiny_config(num_chips):
  from vfocal_jax.configs import k400_tiny
  config = k400_tiny.get_config()
  config.num_frames = 4
  # Two one-block stages, 8 channels (7k parameters: 28 KiB of f32 gradients) and 64x64 frames (one chip's
  # video micro-batch, 2 clips in bf16: 192 KiB): a collective that moved video would stand out by its size.
  config.image_size = 64
  config.model.embed_dim = 8
  config.model.depths = (1, 1)
  config.model.focal_levels = (1, 1)
  config.model.num_classes = 10
  config.model.dtype = "bfloat16"
  config.mixup_alpha, config.cutmix_alpha = 0.8, 1.0
  config.accumulation_steps = ACCUM
  config.batch_size = CLIPS_PER_CHIP * num_chips
  return config


def _compile(topology):
  devices = plan.target_devices(topology)
  config = plan.target_config(tiny_config(len(devices)), "tpu", len(devices))
  mesh = plan.build_mesh(config, devices)
  steps = plan.compile_steps(config, mesh, eval=False)
  assert steps.train.compiled is not None, steps.train.error
  params = steps.trainer.abstract_state.params
  return config, steps.train.compiled, sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(params))


@pytest.fixture(scope="module")
def compiled():
  return {t: _compile(t) for t in ("v5e:2x2", "v5e:4x4")}


def test_train_step_collectives_are_per_chip_constant_and_never_video(compiled):
  ops, memory = {}, {}
  for topology, (config, exe, params_bytes) in compiled.items():
    ops[topology] = tpu_specs.collective_ops(exe.as_text())
    memory[topology] = tpu_specs.memory_stats(exe)["total"]
    video_bytes = CLIPS_PER_CHIP * config.num_frames * config.image_size ** 2 * 3 * 2  # bf16, one micro-batch
    assert params_bytes < video_bytes
    assert ops[topology], "the gradients must be reduced over 'data'"
    for op in ops[topology]:
      assert op["kind"] == "all-reduce", f"{topology}: {op}"
      assert op["bytes"] < video_bytes, f"{topology}: {op} moves video-sized data"
    # Gradient reduction (at most the f32 parameters once per micro-batch) and a few metrics scalars.
    assert sum(op["bytes"] for op in ops[topology]) <= ACCUM * params_bytes + 4096
  assert sorted(o["bytes"] for o in ops["v5e:2x2"]) == sorted(o["bytes"] for o in ops["v5e:4x4"])
  assert memory["v5e:4x4"] == pytest.approx(memory["v5e:2x2"], rel=0.02)
