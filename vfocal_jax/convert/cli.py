"""`python main.py convert`: PyTorch `.pth` -> converted checkpoint, or Flax -> safetensors.

    # a released Kinetics-400 checkpoint (architecture read from the weights)
    python main.py convert --pth=video-focalnet_tiny.pth --output_dir=converted/k400_tiny
    # an ImageNet FocalNet-SRF checkpoint into a Video-FocalNet of the config
    python main.py convert --pth=focalnet_tiny_srf.pth --imagenet --output_dir=converted/init \
        --config=configs/k400_tiny.py
    # back to PyTorch (official key names)
    python main.py convert --checkpoint=converted/k400_tiny --to_torch=model.safetensors

The architecture fields that the weights determine (embed_dim, depths, focal
levels and windows, patch and tubelet size, layerscale, post-LN in the
modulation, MLP ratio, number of classes) are read from the state dict; the
rest (num_frames, use_postln, normalize_modulator, drop rates) come from
`--variant` or `--config.model`.
"""
from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vfocal_jax import params_io
from vfocal_jax.convert.torch_pickle import load_torch_checkpoint

__all__ = ["run", "infer_model_kwargs", "convert_state_dict"]


def _config_model_kwargs(config: Any) -> dict[str, Any]:
  model_cfg = getattr(config, "model", None) if config is not None else None
  if model_cfg is None:
    return {}
  return dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)


def _create_model(model_kwargs: dict[str, Any]) -> Any:
  """`create_model` with JSON/ConfigDict values normalised (lists -> tuples, dtype names)."""
  from vfocal_jax.models import create_model  # pylint: disable=import-outside-toplevel
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in model_kwargs.items()}
  for key in ("dtype", "param_dtype"):
    if isinstance(kwargs.get(key), str):
      kwargs[key] = jnp.dtype(kwargs[key])
  return create_model(**kwargs)


def infer_model_kwargs(state_dict: Mapping[str, np.ndarray], *,
                       with_head: bool = True) -> dict[str, Any]:
  """Architecture fields that an official-layout state dict determines.

  Args:
    state_dict: `{official key: array}` (Video-FocalNet or ImageNet FocalNet).
    with_head: also infer `num_classes` from `head.weight`.
  """
  out: dict[str, Any] = {}
  stem = state_dict.get("patch_embed.proj.weight")
  if stem is not None:
    out["embed_dim"] = int(stem.shape[0])
    out["tubelet_size"] = int(stem.shape[2]) if stem.ndim == 5 else 1
    out["use_conv_embed"] = stem.shape[-1] == 7 and "layers.0.downsample.proj.weight" in state_dict \
        and state_dict["layers.0.downsample.proj.weight"].shape[-1] == 3
    if not out["use_conv_embed"]:
      out["patch_size"] = int(stem.shape[-1])
  blocks: dict[int, set[int]] = {}
  levels: dict[int, set[int]] = {}
  windows: dict[int, int] = {}
  for key, value in state_dict.items():
    m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", key)
    if not m:
      continue
    stage, block = int(m.group(1)), int(m.group(2))
    blocks.setdefault(stage, set()).add(block)
    m2 = re.match(r"layers\.\d+\.blocks\.\d+\.modulation\.focal_layers\.(\d+)\.0\.weight$", key)
    if m2:
      levels.setdefault(stage, set()).add(int(m2.group(1)))
      if int(m2.group(1)) == 0:
        windows[stage] = int(value.shape[-1])
    if key.endswith(".gamma_1"):
      out["use_layerscale"] = True
    if key.endswith(".modulation.ln.weight"):
      out["use_postln_in_modulation"] = True
    if stage == 0 and block == 0 and key.endswith("mlp.fc1.weight"):
      out["mlp_ratio"] = float(value.shape[0] / value.shape[1])
  if blocks:
    stages = range(max(blocks) + 1)
    out["depths"] = tuple(max(blocks.get(i, {-1})) + 1 for i in stages)
    if levels:
      out["focal_levels"] = tuple(max(levels.get(i, {-1})) + 1 for i in stages)
      out["focal_windows"] = tuple(windows.get(i, 3) for i in stages)
  out.setdefault("use_layerscale", False)
  out.setdefault("use_postln_in_modulation", False)
  if with_head and "head.weight" in state_dict:
    out["num_classes"] = int(state_dict["head.weight"].shape[0])
  return out


def _resolve_model_kwargs(config: Any, variant: str | None, inferred: dict[str, Any]
                          ) -> dict[str, Any]:
  base = {"variant": variant} if variant else _config_model_kwargs(config)
  base.setdefault("variant", "tiny")
  kwargs = dict(base)
  for key, value in inferred.items():
    if key in base and base[key] != value and not (isinstance(value, tuple)
                                                   and tuple(base[key]) == value):
      print(f"  note: model.{key}={base[key]!r} from the config replaced by {value!r} from the weights")
    kwargs[key] = value
  return kwargs


def convert_state_dict(state_dict: Mapping[str, np.ndarray], *, model_kwargs: dict[str, Any],
                       allow_partial: bool = False, imagenet: bool = False,
                       seed: int = 0) -> tuple[Any, Any]:
  """Maps an official state dict onto `create_model(**model_kwargs)`.

  Returns:
    `(variables, report)`; report is None for a complete load.
  """
  from vfocal_jax.convert import mapping  # pylint: disable=import-outside-toplevel
  model = _create_model(model_kwargs)
  if imagenet:
    return mapping.init_from_imagenet(dict(state_dict), model, jax.random.key(seed))
  if allow_partial:
    return mapping.torch_to_flax(dict(state_dict), model, allow_partial=True)
  return mapping.torch_to_flax(dict(state_dict), model), None


def _print_report(report: Any) -> None:
  if report is None:
    return
  if isinstance(report, Mapping):
    for key, value in report.items():
      items = list(value) if isinstance(value, (list, tuple, set, dict)) else value
      if isinstance(items, list):
        print(f"  {key} ({len(items)}):")
        for item in items[:50]:
          print(f"    {item}")
        if len(items) > 50:
          print(f"    ... and {len(items) - 50} more")
      else:
        print(f"  {key}: {items}")
  else:
    print(f"  {report}")


def _to_torch(config: Any, to_torch: str, checkpoint: str | None, workdir: str | None) -> None:
  from vfocal_jax.convert.safetensors_io import flax_to_torch  # pylint: disable=import-outside-toplevel
  if checkpoint:
    params, model_kwargs = params_io.load_params(checkpoint)
    source = checkpoint
  elif workdir:
    try:
      from vfocal_jax.checkpoints import load_params_from_workdir  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise RuntimeError("--workdir needs vfocal_jax.checkpoints (training); "
                         "pass --checkpoint=CONVERTED_DIR instead") from e
    params, train_config = load_params_from_workdir(workdir)
    model_kwargs = _config_model_kwargs(train_config)
    source = workdir
  else:
    raise ValueError("convert --to_torch=FILE.safetensors needs --checkpoint=CONVERTED_DIR "
                     "(from `main.py convert --pth`) or --workdir=TRAINING_WORKDIR")
  model = _create_model(model_kwargs)
  tensors = flax_to_torch({"params": params}, model, to_torch,
                          metadata={"format": "pt", "source": os.path.abspath(source)})
  print(f"Wrote {len(tensors)} tensors ({sum(v.size for v in tensors.values()):,} parameters) "
        f"with the official key names to {to_torch}")
  print("  PyTorch: model.load_state_dict(safetensors.torch.load_file(path))")


def run(*, config: Any = None, pth: str | None = None, output_dir: str | None = None,
        variant: str | None = None, to_torch: str | None = None, checkpoint: str | None = None,
        workdir: str | None = None, allow_partial: bool = False, imagenet: bool = False) -> None:
  """The `convert` command (see the module doc); errors say which flag fixes them."""
  if to_torch:
    _to_torch(config, to_torch, checkpoint, workdir)
    return
  if not pth:
    raise ValueError("convert needs --pth=FILE.pth (and --output_dir=DIR), "
                     "or --to_torch=FILE.safetensors with --checkpoint=DIR")
  if not os.path.isfile(pth):
    raise FileNotFoundError(f"--pth={pth}: no such file")
  if not output_dir:
    raise ValueError("convert --pth needs --output_dir=DIR for the converted checkpoint")
  if variant and variant not in ("tiny", "small", "base", "custom"):
    raise ValueError(f"--variant={variant!r}: expected tiny, small, base or custom")

  print(f"Reading {pth} (no torch import, nothing from the file is executed)")
  state_dict = load_torch_checkpoint(pth)
  inferred = infer_model_kwargs(state_dict, with_head=not (imagenet or allow_partial))
  if imagenet:  # the video fields (frames, tubelet, classes) come from the config
    inferred = {k: v for k, v in inferred.items() if k not in ("tubelet_size",)}
  model_kwargs = _resolve_model_kwargs(config, variant, inferred)
  print(f"  model: {model_kwargs}")
  from vfocal_jax.convert import mapping  # pylint: disable=import-outside-toplevel
  try:
    variables, report = convert_state_dict(
        state_dict, model_kwargs=model_kwargs, allow_partial=allow_partial, imagenet=imagenet)
  except mapping.CheckpointMismatchError:
    print("The checkpoint does not match the model above. If it is an ImageNet FocalNet-SRF "
          "checkpoint, add --imagenet; to load what matches and initialise the rest, add "
          "--allow_partial; otherwise check --variant / --config.model.*", file=sys.stderr)
    raise
  if report is not None:
    print("Partial load report:")
    _print_report(report)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
  path = params_io.save_params(output_dir, variables["params"], model_kwargs)
  print(f"Wrote {num_params:,} parameters to {path} (Orbax params/ + model.json)")
  print(f"  use it with: --checkpoint={path}")
