"""The input side of ``plan``: the host cores and storage bandwidth it takes to feed the estimated train step.

``input_budget`` is a pure function of the estimated clips/s per chip, the
input pipeline's measured clips/s per host core, the bytes read per clip
(``shard_bytes_per_clip``: the train shards' average record) and the TPU VM's
vCPUs per chip (``tpu_specs.HOSTS``); ``format_input`` prints it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from vfocal_jax import tpu_specs
from vfocal_jax.plan_report import JsonRecord

# Bytes read for one training clip when the config names no shards: one whole record (segment sampling
# parses every stored frame) of a 10-s, 30-fps, 256-px video, as make_shards stores it with every frame
# (frames_per_video=0) and with --frames_per_video=32 (docs/data.md).
REFERENCE_RECORD_BYTES = ((0, 7.81e6), (32, 0.83e6))


def shard_bytes_per_clip(config: ml_collections.ConfigDict) -> tuple[float | None, str]:
  """Bytes read per training clip: the train shards' average record (file bytes / records), and where from.

  One training clip reads one whole record. None (with the reason) when the
  config names no train shards or their record counts are unknown (no
  ``dataset_info.json``): nothing is read to find out.
  """
  data = config.get("data")
  if data is None or data.get("source", "shards") != "shards" or not data.get("train_shards"):
    return None, "the config names no train shards (config.data.train_shards)"
  import tensorflow as tf
  from vfocal_jax.input_pipeline import sources
  try:
    shards = sources.load_shard_set(data.train_shards)
    if not shards.num_examples:
      return None, f"no record counts beside {data.train_shards} (no dataset_info.json)"
    total = sum(tf.io.gfile.stat(f).length for f in shards.files)
  except (OSError, ValueError, tf.errors.OpError) as e:
    return None, f"the train shards could not be listed ({tpu_specs.summarize_error(e, 150)})"
  return total / shards.num_examples, f"average record of the {len(shards.files)} train shard file(s)"


@dataclasses.dataclass
class ReferenceRate(JsonRecord):
  frames_per_video: int
  bytes_per_clip: float
  storage_bytes_per_second_per_chip: float | None


@dataclasses.dataclass
class InputBudget(JsonRecord):
  clips_per_second_per_chip: float | None
  clips_per_second: float | None
  pipeline_clips_per_core: float | None
  host_cores_per_chip: float | None
  host: dict[str, Any] | None       # machine_type, vcpus, chips, vcpus_per_chip, source.
  keeps_up: bool | None
  bytes_per_clip: float | None
  bytes_per_clip_source: str
  storage_bytes_per_second_per_chip: float | None
  storage_bytes_per_second: float | None
  reference: list[ReferenceRate]


def input_budget(clips_per_second_per_chip: float | None, *, num_chips: int, pipeline_clips_per_core: float | None,
                 bytes_per_clip: float | None, bytes_source: str,
                 host: tpu_specs.HostSpec | None) -> InputBudget:
  """The host cores and storage bandwidth per chip that the estimated train step needs (a pure function).

  ``keeps_up``: the cores needed per chip fit in the TPU VM's vCPUs per chip
  (None when either is unknown). ``reference``: the storage rate for the
  whole records of ``REFERENCE_RECORD_BYTES``, whatever the config's data.
  """
  rate = clips_per_second_per_chip
  cores = rate / pipeline_clips_per_core if rate and pipeline_clips_per_core else None
  per_chip = lambda b: None if rate is None or b is None else rate * b
  return InputBudget(
      clips_per_second_per_chip=rate,
      clips_per_second=None if rate is None else rate * num_chips,
      pipeline_clips_per_core=pipeline_clips_per_core,
      host_cores_per_chip=cores,
      host=None if host is None else {"machine_type": host.machine_type, "vcpus": host.vcpus, "chips": host.chips,
                                      "vcpus_per_chip": host.vcpus_per_chip, "source": host.source},
      keeps_up=None if cores is None or host is None else cores <= host.vcpus_per_chip,
      bytes_per_clip=bytes_per_clip, bytes_per_clip_source=bytes_source,
      storage_bytes_per_second_per_chip=per_chip(bytes_per_clip),
      storage_bytes_per_second=None if per_chip(bytes_per_clip) is None else per_chip(bytes_per_clip) * num_chips,
      reference=[ReferenceRate(m, b, per_chip(b)) for m, b in REFERENCE_RECORD_BYTES])


def format_input(i: dict[str, Any] | InputBudget) -> list[str]:
  """The report's lines on the input side (from its JSON form; an ``InputBudget`` is converted)."""
  if isinstance(i, InputBudget):
    i = i.to_json()
  rate = i["clips_per_second_per_chip"]
  if rate is None:
    return ["input: no estimated train step time, so no input budget"]
  mb = lambda b: f"{b / 1e6:.3g} MB"
  lines = [f"input: the estimated train step consumes {rate:.1f} clips/s per chip ({i['clips_per_second']:.0f} for "
           "the slice)"]
  host = i["host"]
  vm = ("" if host is None else f"; a {host['machine_type']} TPU VM has {host['vcpus_per_chip']:g} vCPUs per chip "
        f"({host['vcpus']} for {host['chips']} chips, {host['source']})")
  if i["host_cores_per_chip"] is None:
    lines.append("  host cores per chip: unknown (give --pipeline_clips_per_core, the training clips/s per core "
                 f"measured by benchmarks/bench_input_pipeline.py){vm}")
  else:
    verdict = {True: ": keeps up", False: ": DOES NOT keep up", None: ""}[i["keeps_up"]]
    lines.append(f"  host cores per chip: {i['host_cores_per_chip']:.2g} at {i['pipeline_clips_per_core']:g} clips/s "
                 f"per core{vm}{verdict}")
  if i["bytes_per_clip"] is not None:
    lines.append(f"  storage: {mb(i['bytes_per_clip'])} read per clip ({i['bytes_per_clip_source']}) -> "
                 f"{mb(i['storage_bytes_per_second_per_chip'])}/s per chip, {mb(i['storage_bytes_per_second'])}/s "
                 "for the slice")
  else:
    refs = ", ".join(f"{mb(r['bytes_per_clip'])} (frames_per_video={r['frames_per_video']}) -> "
                     f"{mb(r['storage_bytes_per_second_per_chip'])}/s" for r in i["reference"])
    lines.append(f"  storage: bytes per clip unknown ({i['bytes_per_clip_source']}); per chip, for whole records of "
                 f"a 10-s 30-fps 256-px video: {refs}")
  return lines
