"""Checks of the training fields of a config, before a run writes anything.

``validate(config)`` raises one ``errors.ConfigError`` naming every bad field as the
flag that would fix it (``--config.batch_size=30: must divide by the 4
devices of the mesh's 'data' axis ...``); the command line prints it as one
line. Types and unknown fields are already caught by the locked config.
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections

from vfocal_jax import errors as errors_lib
from vfocal_jax import sharding

OPTIMIZERS = ("sgd", "adamw")


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
             num_processes: int | None = None) -> None:
  """Raises ``errors.ConfigError`` if a training field cannot work; returns None when they all can."""
  errors: list[str] = []

  def bad(field: str, why: str) -> None:
    errors.append(f"--config.{field}={_show(_get(config, field))}: {why}")

  for field in ("batch_size", "eval_batch_size", "accumulation_steps", "log_every_steps", "checkpoint_every_steps",
                "keep_checkpoints", "eval_num_clips", "eval_num_crops", "test_num_clips", "test_num_crops"):
    if int(_get(config, field)) < 1:
      bad(field, "must be at least 1")
  for field in ("keep_best_checkpoints", "eval_every_epochs", "warmup_epochs", "mixup_alpha", "cutmix_alpha",
                "grad_clip_norm", "weight_decay", "base_lr", "warmup_lr", "min_lr"):
    if float(_get(config, field)) < 0:
      bad(field, "must not be negative")
  if not 0 <= float(config.label_smoothing) < 1:
    bad("label_smoothing", "must be in [0, 1)")
  if not 0 <= float(config.mixup_switch_prob) <= 1:
    bad("mixup_switch_prob", "must be in [0, 1]")
  if int(config.num_train_steps) == 0 or int(config.num_train_steps) < -1:
    bad("num_train_steps", "must be > 0, or -1 to train for num_epochs")
  elif int(config.num_train_steps) < 0 and float(config.num_epochs) <= 0:
    bad("num_epochs", "must be > 0 (or set --config.num_train_steps)")
  if str(config.optimizer).lower() not in OPTIMIZERS:
    bad("optimizer", f"expected one of {', '.join(OPTIMIZERS)}")
  from vfocal_jax.models import layers, video_focalnet  # pylint: disable=import-outside-toplevel
  for field, choices in (("remat_policy", video_focalnet.REMAT_POLICIES), ("layer_norm_impl", layers.LAYER_NORM_IMPLS),
                         ("focal_projection", video_focalnet.FOCAL_PROJECTIONS)):
    if "model" in config and field in config.model and str(config.model[field]) not in choices:
      bad(f"model.{field}", f"expected one of {', '.join(choices)}")

  num_devices = jax.device_count() if num_devices is None else num_devices
  num_processes = jax.process_count() if num_processes is None else num_processes
  try:
    data_axis = sharding.resolve_mesh_shape(config.mesh_shape, num_devices)[0]
  except ValueError as e:
    bad("mesh_shape", str(e).rstrip("."))
    data_axis = None
  mesh = f"mesh_shape {tuple(config.mesh_shape)} on {num_devices} devices"
  accum = max(int(config.accumulation_steps), 1)
  if data_axis and int(config.batch_size) >= 1 and int(config.batch_size) % data_axis:
    bad("batch_size", f"must divide by the {data_axis} devices of the mesh's 'data' axis ({mesh}); "
        "it is the global batch of one micro-step")
  elif int(config.batch_size) * accum % num_processes:
    bad("batch_size", f"batch_size x accumulation_steps must divide by the {num_processes} processes")
  if data_axis and int(config.eval_batch_size) >= 1 and int(config.eval_batch_size) % data_axis:
    bad("eval_batch_size", f"must divide by the {data_axis} devices of the mesh's 'data' axis ({mesh})")
  elif int(config.eval_batch_size) % num_processes:
    bad("eval_batch_size", f"must divide by the {num_processes} processes")
  if errors:
    raise errors_lib.ConfigError("; ".join(errors))


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
  node = config
  for part in field.split("."):
    node = node[part]
  return node


def _show(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return ",".join(str(v) for v in value)
  return str(value)
