"""``plan``: a tiny Video-FocalNet compiled for a v5e:2x2 slice on the CPU (libtpu's compile-only devices).

The report is checked against the compiled executables' own analyses (read
here again from the executables) and against what the arrays must take; a
batch far too large is reported as not fitting, without an exception.
"""
import json
import os
import types

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from vfocal_jax import plan, tpu_specs  # noqa: E402

TOPOLOGY = "v5e:2x2"
PER_CORE = 40.0  # --pipeline_clips_per_core


def tiny_config(**overrides):
  from vfocal_jax.configs import k400_tiny
  config = k400_tiny.get_config()
  config.num_frames = 4
  config.image_size = 32
  config.model.embed_dim = 16
  config.model.depths = (1, 1, 1, 1)
  config.model.focal_levels = (1, 1, 1, 1)  # 3x3 depthwise only: quicker compiles.
  config.model.num_classes = 10
  config.batch_size = 8
  config.eval_batch_size = 8
  config.test_num_clips = 1
  config.test_num_crops = 1
  for key, value in overrides.items():
    config[key] = value
  return config


# The --json keys (docs/plan.md): search_batch only with --search_batch, measured_step_seconds only measured.
REPORT_KEYS = {"topology", "platform", "device_kind", "num_chips", "num_devices", "devices_per_chip", "mesh_shape",
               "chip", "config", "estimates", "unknown", "warnings", "train", "eval", "input"}
STEP_KEYS = {"ok", "error", "global_batch", "batch_per_chip", "clips_per_chip", "lower_seconds", "compile_seconds",
             "failed_after_seconds", "hbm_bytes_per_chip", "fits", "memory_per_chip", "total_bytes_per_chip",
             "flops_per_chip", "bytes_accessed_per_chip", "estimated_step_seconds",
             "estimated_clips_per_second_per_chip", "estimated_mfu", "roofline_step_seconds", "cost_analysis_raw",
             "unmodelled_custom_calls", "collectives", "traffic",
             "flops_source", "model_flops_per_chip", "bytes_source"}  # The last three: new with the GPU plans.


def _nbytes(tree):
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def planned():
  """The report as its JSON (the contract: ``--json`` and docs/plan.md's keys) and the compile attempts."""
  report, steps = plan.make_report(tiny_config(), topology=TOPOLOGY, pipeline_clips_per_core=PER_CORE)
  assert isinstance(report, plan.Report) and report.train.ok and report.eval.clips_per_chip == 2
  # The printed report is a function of the JSON: a --json file read back prints the same.
  assert plan.format_report(report) == plan.format_report(json.loads(json.dumps(report.to_json())))
  return report.to_json(), steps


def test_report_matches_the_compiled_steps(planned):
  report, steps = planned
  assert report["topology"] == TOPOLOGY and report["num_chips"] == 4 and report["devices_per_chip"] == 1
  assert report["device_kind"] == "TPU v5 lite" and report["mesh_shape"] == [4, 1]
  assert report["config"]["depthwise_impl"] == "xla"  # Resolved for the TPU, not for this CPU.
  json.dumps(report)  # JSON-able as is.
  assert set(report) == REPORT_KEYS and set(report["train"]) == STEP_KEYS and set(report["eval"]) == STEP_KEYS
  assert report["train"]["flops_source"] == report["train"]["bytes_source"] == "compiler"
  assert report["train"]["model_flops_per_chip"] == pytest.approx(report["train"]["flops_per_chip"], rel=0.5)
  for name in ("train", "eval"):
    s, compiled = report[name], getattr(steps, name).compiled
    assert s["ok"] and s["error"] is None and compiled is not None
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
             + m.generated_code_size_in_bytes)
    assert s["total_bytes_per_chip"] == total
    assert s["memory_per_chip"]["temp"] == m.temp_size_in_bytes
    assert s["memory_per_chip"]["argument"] == m.argument_size_in_bytes
    assert s["hbm_bytes_per_chip"] == 16 * 2 ** 30 and s["fits"] is True
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    # Custom calls outside fusions are booked at -1 s / -1 FLOP by the cost analysis: plan counts them as free.
    calls = tpu_specs.unmodelled_custom_calls(compiled.as_text())
    n = sum(v for k, v in calls.items() if k not in tpu_specs.COSTED_CUSTOM_CALLS)
    assert sum(s["unmodelled_custom_calls"].values()) == n
    assert s["cost_analysis_raw"]["optimal_seconds"] == pytest.approx(cost["optimal_seconds"])
    assert s["flops_per_chip"] == pytest.approx(cost["flops"] + n)
    t = cost["optimal_seconds"] + n
    assert s["estimated_step_seconds"] == pytest.approx(t)
    assert 0 < s["estimated_step_seconds"] < 1
    assert s["estimated_mfu"] == pytest.approx((cost["flops"] + n) / (t * 197e12))
    assert s["batch_per_chip"] == 2
    assert s["estimated_clips_per_second_per_chip"] == pytest.approx(2 / t)
    assert s["roofline_step_seconds"] == pytest.approx(
        max((cost["flops"] + n) / 197e12, (cost["bytes accessed"] + n) / 819e9))
    assert s["collectives"] == tpu_specs.collectives(compiled.as_text())

  # What the arrays must take: the train step holds the whole (replicated) state and a quarter of the batch,
  # and gets the donated state back as its output.
  trainer = steps.trainer
  state_bytes, params_bytes = _nbytes(trainer.abstract_state), _nbytes(trainer.abstract_state.params)
  batch_bytes = _nbytes(plan.train_batch_specs(trainer.config, trainer.mesh)) // 4
  train = report["train"]["memory_per_chip"]
  assert train["argument"] >= state_bytes + batch_bytes
  assert train["alias"] >= 0.9 * state_bytes
  assert report["eval"]["memory_per_chip"]["argument"] >= params_bytes
  # Forward + backward is about 3 forwards per clip.
  per_clip = {n: report[n]["flops_per_chip"] / report[n]["clips_per_chip"] for n in ("train", "eval")}
  assert 2 < per_clip["train"] / per_clip["eval"] < 4.5
  # The gradients are summed over the 'data' axis: at least the parameters' size in bf16.
  reduced = {e["kind"]: e["bytes"] for e in report["train"]["collectives"]}
  assert reduced.get("all-reduce", 0) >= params_bytes // 2

  text = plan.format_report(report)
  assert "compiler's cost-model estimate" in text and "fits" in text and "all-reduce" in text

  # The input side: the clips/s the estimate implies, the host cores that takes, the VM's vCPUs per chip.
  i, rate = report["input"], report["train"]["estimated_clips_per_second_per_chip"]
  assert i["clips_per_second_per_chip"] == rate and i["clips_per_second"] == pytest.approx(4 * rate)
  assert i["host_cores_per_chip"] == pytest.approx(rate / PER_CORE)
  assert i["host"]["vcpus_per_chip"] == 112 / 4 and i["keeps_up"] == (rate / PER_CORE <= 28)
  assert i["bytes_per_clip"] is None and "train_shards" in i["bytes_per_clip_source"]
  storage = [r["storage_bytes_per_second_per_chip"] for r in i["reference"]]
  assert storage == pytest.approx([rate * 7.81e6, rate * 0.83e6])  # docs/data.md's records
  assert f"{rate:.1f} clips/s per chip" in text and "28 vCPUs per chip" in text


def test_traffic_breakdown_adds_up_and_names_every_part(planned):
  report, steps = planned
  for name, direction in (("train", ("fwd", "bwd")), ("eval", ("fwd",))):
    t, compiled = report[name]["traffic"], getattr(steps, name).compiled
    per = report[name]["clips_per_chip"]  # One device per chip.
    # The parts' bytes add up to the program's total, attributed or not.
    assert sum(r["bytes"] for r in t["by_part"]) == pytest.approx(t["bytes"])
    assert sum(r["bytes"] for r in t["by_component"]) == pytest.approx(t["bytes"])
    assert t["unattributed_bytes"] < 0.5 * t["bytes"]
    # Within a factor of the compiler's own count of bytes accessed (it counts inside fusions too).
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert 0.5 < t["bytes"] * per / cost["bytes accessed"] < 1.5
    parts = {r["name"] for r in t["by_part"]}
    for d in direction:  # Every part of the model, in every stage, each way.
      for stage in range(4):
        for component in ("norm", "spatial", "temporal", "gating", "mlp"):
          assert f"stage{stage}.block0.{component} {d}" in parts, (name, stage, component, d)
        if stage < 3:
          assert f"stage{stage}.downsample {d}" in parts
      assert f"stem {d}" in parts and f"head {d}" in parts
    assert t["top_by_bytes"] and t["top_by_cycles"]  # The TPU cost model's cycles are there.
  train_parts = {r["name"] for r in report["train"]["traffic"]["by_part"]}
  assert {"input", "mixup", "loss", "optimizer"} <= train_parts  # The train step's named scopes.
  assert "memory traffic" in plan.format_report(report)


def test_input_budget_from_the_shards(tmp_path):
  """Bytes per clip = the train shards' bytes / their records (dataset_info.json); cores and bandwidth per chip."""
  sizes, counts = {"a.tfrecord": 3000, "b.tfrecord": 1000}, {"a.tfrecord": 3, "b.tfrecord": 2}
  for name, n in sizes.items():
    (tmp_path / name).write_bytes(b"x" * n)
  (tmp_path / "dataset_info.json").write_text(json.dumps({"shards": counts, "num_classes": 10}))
  config = tiny_config()
  config.data.train_shards = str(tmp_path)
  per_clip, source = plan.shard_bytes_per_clip(config)
  assert per_clip == 4000 / 5 and "2 train shard" in source
  host = tpu_specs.host_spec(tpu_specs.chip_spec("TPU v4"))
  i = plan.input_budget(90.0, num_chips=16, pipeline_clips_per_core=30.0, bytes_per_clip=per_clip,
                        bytes_source=source, host=host).to_json()
  assert i["host_cores_per_chip"] == 3.0 and i["host"]["vcpus_per_chip"] == 60 and i["keeps_up"] is True
  assert i["storage_bytes_per_second_per_chip"] == 90 * 800 and i["storage_bytes_per_second"] == 16 * 90 * 800
  slow = plan.input_budget(90.0, num_chips=16, pipeline_clips_per_core=1.0, bytes_per_clip=None, bytes_source="?",
                           host=host).to_json()
  assert slow["keeps_up"] is False and slow["storage_bytes_per_second_per_chip"] is None
  text = "\n".join(plan.format_input(slow))
  assert "DOES NOT keep up" in text and "frames_per_video=32" in text
  (tmp_path / "dataset_info.json").write_text(json.dumps({"num_classes": 10}))  # No per-shard counts.
  assert plan.shard_bytes_per_clip(config)[0] is None
  with pytest.raises(ValueError, match="--pipeline_clips_per_core=0"):
    plan.make_report(config, topology=TOPOLOGY, pipeline_clips_per_core=0)


def test_batch_far_too_large_is_reported_not_raised(tmp_path, capsys):
  config = tiny_config(batch_size=4 * 65536)
  path = str(tmp_path / "plan.json")
  report = plan.run(config, topology=TOPOLOGY, json_path=path).to_json()
  train = report["train"]
  assert train["ok"] is False and train["fits"] is False and train["batch_per_chip"] == 65536
  assert "\n" not in train["error"] and "memory" in train["error"].lower() and len(train["error"]) <= 300
  assert report["eval"]["fits"] is True  # The eval batch is unchanged.
  out = capsys.readouterr().out
  assert "does not fit" in out and "Traceback" not in out
  with open(path) as f:
    saved = json.load(f)
  assert saved["train"]["fits"] is False and saved == json.loads(json.dumps(report))  # The file is to_json().


def test_batch_that_does_not_divide_names_the_field(capsys):
  report = plan.run(tiny_config(batch_size=6, eval_batch_size=10), topology=TOPOLOGY).to_json()
  assert "batch_size=6" in report["train"]["error"] and "'data'" in report["train"]["error"]
  assert "eval_batch_size=10" in report["eval"]["error"]
  assert report["train"]["fits"] is None and not report["train"]["ok"]
  assert "batch_size=6 does not divide" in capsys.readouterr().out


def test_unknown_topology_is_one_line():
  with pytest.raises(ValueError, match="topology=v9z:2x2") as info:
    plan.target_devices("v9z:2x2")
  assert "\n" not in str(info.value)


def test_target_config_resolves_depthwise_for_the_target_and_copies():
  config = tiny_config()  # mesh_shape (-1, 1): no 'model' axis
  config.lock()
  tpu = plan.target_config(config, "tpu", 4, batch_size=16, **{"model.remat": True})
  assert tpu.model.depthwise_impl == "xla" and tpu.batch_size == 16 and tpu.model.remat
  assert "depthwise_impl" not in config.model and config.batch_size == 8
  assert plan.target_config(config, "cpu", 4).model.depthwise_impl == "shift"
  # A 'model' axis > 1: XLA's grouped-conv kernel gradient is wrong there, so 'auto' never picks it.
  config = tiny_config(mesh_shape=(-1, 2))
  assert plan.target_config(config, "tpu", 8).model.depthwise_impl == "shift"
  assert plan.target_config(config, "tpu", 2).model.depthwise_impl == "shift"
  config.model.depthwise_impl = "xla"  # Explicit: kept (and the report warns).
  assert plan.target_config(config, "gpu", 8).model.depthwise_impl == "xla"


@pytest.mark.parametrize("largest", [1, 5, 8, 37, 64, 1000])
@pytest.mark.parametrize("start", [1, 8, 100])
def test_search_largest(largest, start):
  calls = []

  def fits(n):
    calls.append(n)
    return n <= largest

  assert plan.search_largest(fits, start=start, limit=4096) == largest
  assert len(calls) <= 2 * 12 + 2 and len(set(calls)) == len(calls)


def test_search_largest_edges():
  assert plan.search_largest(lambda n: False, start=8) is None
  assert plan.search_largest(lambda n: True, start=3, limit=50) == 50


def test_collectives_from_hlo_text():
  hlo = "\n".join([
      "ENTRY %main {",
      "  %all-reduce.1 = (bf16[10]{0}, f32[128,10]{1,0:T(8,128)}, /*index=2*/f32[]{:T(128)}) all-reduce(%a, %b, %c), "
      "channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add",
      "  %all-gather.7 = f32[8,4,32,32,3]{3,2,4,1,0:T(8,128)S(1)} all-gather(%x), channel_id=4, dimensions={0}",
      "  %ags = ((bf16[2,16]{1,0}), bf16[8,16]{1,0}, u32[], u32[]) all-gather-start(%y), dimensions={0}",
      "  %agd = bf16[8,16]{1,0} all-gather-done(%ags)",
      "  ROOT %rs = u8[4]{0} reduce-scatter(%z), dimensions={0}",
      "  %fusion = f32[2]{0} fusion(%all-gather.7), kind=kLoop, calls=%all-reduce_like_name",
      "}"])
  got = {e["kind"]: (e["count"], e["bytes"]) for e in tpu_specs.collectives(hlo)}
  assert got == {"all-reduce": (1, 20 + 128 * 10 * 4 + 4), "all-gather": (2, 8 * 4 * 32 * 32 * 3 * 4 + 8 * 16 * 2),
                 "reduce-scatter": (1, 4)}


def test_uncosted_custom_calls_outside_fusions_are_counted_as_free():
  hlo = "\n".join([
      "%fused_computation.1 (param_0: s32[4]) -> s32[4] {",
      '  ROOT %cc = s32[4]{0} custom-call(%param_0), custom_call_target="AssumeGatherIndicesInBound"',
      "}",
      "",
      "ENTRY %main.282_spmd (p: bf16[8,96]) -> bf16[8,192] {",
      "  %fusion.3 = s32[4]{0} fusion(%p), kind=kLoop, calls=%fused_computation.1",
      '  %concat.1 = bf16[8,192]{1,0} custom-call(%p, %p), custom_call_target="ConcatBitcast"',
      '  %buffer = f32[8,8]{1,0} custom-call(), custom_call_target="AllocateBuffer"',
      '  ROOT %concat.2 = bf16[8,192]{1,0} custom-call(%p, %p), custom_call_target="ConcatBitcast"',
      "}"])
  assert tpu_specs.unmodelled_custom_calls(hlo) == {"ConcatBitcast": 2, "AllocateBuffer": 1}
  fake = types.SimpleNamespace(cost_analysis=lambda: {"optimal_seconds": -1.99, "flops": 98.0,
                                                      "bytes accessed": 8.0, "transcendentals": 3.0})
  cost = tpu_specs.cost_stats(fake, hlo)
  assert cost["optimal_seconds"] == pytest.approx(0.01) and cost["flops"] == 100 and cost["bytes_accessed"] == 10
  assert cost["transcendentals"] == 3 and cost["raw"]["optimal_seconds"] == -1.99
  assert tpu_specs.cost_stats(fake)["optimal_seconds"] is None  # Without the text: no estimate, not a negative one.


def test_summarize_error_is_one_line():
  e = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
                   "(81.78G) exceeds available HBM (15.75G).\n\nBuffer 1: ...\nBuffer 2: ...")
  line = tpu_specs.summarize_error(e)
  assert line.startswith("RESOURCE_EXHAUSTED: Ran out of memory") and "15.75G" in line and "\n" not in line
  assert tpu_specs.is_out_of_memory(e)
  assert tpu_specs.summarize_error(ValueError("first\nsecond")) == "first"


def test_chip_layout_counts_cores_per_chip():
  dev = lambda x, y, core: types.SimpleNamespace(platform="tpu", coords=(x, y, 0), core_on_chip=core)
  v4 = [dev(x, y, c) for y in range(2) for x in range(2) for c in range(2)]  # Two TensorCores per chip.
  assert tpu_specs.chip_layout(v4) == (4, 2)
  assert tpu_specs.chip_layout([dev(x, y, 0) for y in range(2) for x in range(2)]) == (4, 1)
  assert tpu_specs.chip_layout(jax.devices()) == (len(jax.devices()), 1)
  assert tpu_specs.chip_spec("TPU v5 lite").peak_bf16_flops == 197e12
  assert {tpu_specs.chip_spec(k).name for k in ("TPU v4", "TPU v5", "TPU v6 lite")} == {"v4", "v5p", "v6e"}


def test_measure_step_times_a_compiled_function():
  f = jax.jit(lambda x, y: (x + 1, y * 2)).lower(np.zeros(4), np.ones(4)).compile()
  t = plan.measure_step(f, lambda: (np.zeros(4), np.ones(4)), runs=3, donates_first=True)
  assert 0 < t < 10
