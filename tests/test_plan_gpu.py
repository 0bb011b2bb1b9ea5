"""``plan`` for NVIDIA GPUs: a tiny Video-FocalNet compiled for 8 compile-only H100s on the CPU.

Needs JAX's CUDA plugin (``pip install "jax[cuda12]==0.10.2"``, the [cuda12]
extra), which the CPU test requirements leave out: without it the GPU compiles
are skipped (the chip table and target descriptions are still checked). No
GPU is used: with ``JAX_PLATFORMS=cpu`` the plugin skips its driver check and
hands out compile-only devices for ``gpu_specs.target_config``'s description.
"""
import importlib.util
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from test_plan import REPORT_KEYS, STEP_KEYS, tiny_config  # noqa: E402
from vfocal_jax import gpu_specs, plan, summary  # noqa: E402

TOPOLOGY = "h100:8"
NO_PLUGIN = 'the CUDA plugin is not installed (pip install "jax[cuda12]==0.10.2"): no compile-only GPUs'


def test_chip_table_and_topology_names():
  h100, a100, a100_40, h200 = (gpu_specs.GPUS[k] for k in ("h100", "a100", "a100-40gb", "h200"))
  assert h100.peak_bf16_flops == h200.peak_bf16_flops == 989e12 and a100.peak_bf16_flops == 312e12
  assert (h100.hbm_bytes_per_second, h200.hbm_bytes_per_second) == (3.35e12, 4.8e12)
  assert (a100.hbm_bytes_per_second, a100_40.hbm_bytes_per_second) == (2.039e12, 1.555e12)
  # The driver's total, a little under the datasheet's 80 / 40 / 141 GB (as GiB).
  for gpu, nominal in ((h100, 80), (a100, 80), (a100_40, 40), (h200, 141)):
    assert 0.95 * nominal < gpu.hbm_gib <= nominal
  assert gpu_specs.gpu_spec("NVIDIA H100 80GB HBM3") is h100 and gpu_specs.gpu_spec("A100-80GB") is a100
  assert gpu_specs.parse_topology("h100:8") == (h100, 1, 8)
  assert gpu_specs.parse_topology("a100-40gb:2x8") == (a100_40, 2, 8)
  assert gpu_specs.parse_topology("v5e:2x2") is None and not gpu_specs.is_gpu_topology("v5e:2x2")
  text = gpu_specs.target_config(h200)
  for field in ("core_count: 132", "memory_bandwidth: 4800000000000", f"device_memory_size: {h200.hbm_bytes}",
                "cuda_compute_capability { major: 9 minor: 0 }", 'platform_name: "CUDA"',
                'device_description_str: "NVIDIA H200 141GB HBM3e"'):
    assert field in text


def test_gpu_topology_without_the_plugin_is_one_line():
  if importlib.util.find_spec("jax_cuda12_plugin") is not None:
    pytest.skip("the CUDA plugin is installed: the compiles below run instead")
  with pytest.raises(ValueError, match="topology=h100:8.*CUDA plugin") as info:
    plan.target_devices(TOPOLOGY)
  assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def planned():
  pytest.importorskip("jax_cuda12_plugin", reason=NO_PLUGIN)
  report, steps = plan.make_report(tiny_config(), topology=TOPOLOGY)
  assert plan.format_report(report) == plan.format_report(json.loads(json.dumps(report.to_json())))
  return report.to_json(), steps


def test_gpu_report_from_the_compiled_steps(planned):
  report, steps = planned
  assert set(report) == REPORT_KEYS and report["platform"] == "gpu"
  assert report["device_kind"] == "NVIDIA H100 80GB HBM3" and report["num_chips"] == 8
  assert report["devices_per_chip"] == 1 and report["mesh_shape"] == [8, 1]
  assert report["config"]["depthwise_impl"] == "xla"  # Resolved for the GPU, not for this CPU.
  assert report["chip"]["peak_bf16_flops"] == 989e12 and report["chip"]["hbm_bytes"] == 84942979072
  json.dumps(report)
  h100 = gpu_specs.GPUS["h100"]
  for name in ("train", "eval"):
    s, attempt = report[name], getattr(steps, name)
    assert set(s) == STEP_KEYS and s["ok"] and s["error"] is None, s["error"]
    m = attempt.compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
             + m.generated_code_size_in_bytes)
    assert s["total_bytes_per_chip"] == total and s["fits"] is True and s["hbm_bytes_per_chip"] == h100.hbm_bytes
    # No cost analysis on GPU: the FLOPs are the model's count, the bytes the compiled module's traffic.
    assert s["cost_analysis_raw"]["flops"] is None and s["estimated_step_seconds"] is None
    assert s["flops_source"] == "model" and s["bytes_source"] == "hlo"
    assert s["flops_per_chip"] == pytest.approx(2 * summary.count_jaxpr_macs(
        _traced(steps, name).jaxpr) / 8)
    assert s["bytes_accessed_per_chip"] == pytest.approx(s["traffic"]["bytes"] * s["clips_per_chip"])
    assert s["roofline_step_seconds"] == pytest.approx(
        max(s["flops_per_chip"] / 989e12, s["bytes_accessed_per_chip"] / 3.35e12))
    assert s["collectives"] and s["collectives"][0]["kind"] == "all-reduce"
  # Forward + backward is about 3 forwards per clip (the model's count has no element-wise work: close to 3).
  per_clip = {n: report[n]["flops_per_chip"] / report[n]["clips_per_chip"] for n in ("train", "eval")}
  assert 2.5 < per_clip["train"] / per_clip["eval"] < 3.5
  # The gradients are summed over the 8 GPUs: at least the parameters' size in bf16.
  params_bytes = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(steps.trainer.abstract_state.params))
  assert report["train"]["collectives"][0]["bytes"] >= params_bytes // 2
  text = plan.format_report(report)
  assert "Nothing ran on a GPU" in text and "roofline bound" in text and "the model's count" in text
  assert "no optimal_seconds on gpu" in text and "fits (0% of 79.11 GiB)" in text


def _traced(steps, name):
  """The step traced again (cheap): the jaxpr whose MACs plan counted."""
  from vfocal_jax import evaluate
  trainer, config, mesh = steps.trainer, steps.trainer.config, steps.trainer.mesh
  if name == "train":
    return trainer.train_step.trace(trainer.abstract_target(), plan.train_batch_specs(config, mesh))
  step = evaluate.make_eval_step(trainer.model, trainer.num_classes, mesh, trainer.state_sharding.params)
  return step.trace(trainer.abstract_target().params, plan.eval_batch_specs(config, mesh))


def test_gpu_memory_over_jax_default_fraction_warns(planned):
  report, _ = planned
  assert not any("XLA_PYTHON_CLIENT_MEM_FRACTION" in w for w in report["warnings"])  # A tiny model: 0%.


def test_notes_warn_above_the_default_memory_fraction():
  """JAX takes 75% of a GPU by default: a step between that and the whole GPU fits, with a warning."""
  h100 = gpu_specs.GPUS["h100"]
  for fraction, warned in ((0.7, False), (0.8, True)):
    step = plan.StepReport(ok=True, error=None, global_batch=8, batch_per_chip=1, clips_per_chip=1,
                           total_bytes_per_chip=int(fraction * h100.hbm_bytes), estimated_step_seconds=None)
    report = plan.Report(topology=TOPOLOGY, platform="gpu", device_kind=h100.device_kind, num_chips=8,
                         num_devices=8, devices_per_chip=1, mesh_shape=[8, 1], chip=None,
                         config={"depthwise_impl": "xla"}, estimates="", train=step)
    plan._notes(report, hbm=h100.hbm_bytes, chip=h100)
    assert any("XLA_PYTHON_CLIENT_MEM_FRACTION=.95" in w for w in report.warnings) == warned
    assert "train: the compiler's step-time estimate (no optimal_seconds on gpu)" in report.unknown
    assert "search_batch" not in report.to_json() and "measured_step_seconds" not in step.to_json()
