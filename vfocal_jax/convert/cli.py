"""`python main.py convert`: PyTorch `.pth` -> converted checkpoint, or Flax -> safetensors.

    # a released Kinetics-400 checkpoint (architecture read from the weights; paths may be gs://)
    python main.py convert --pth=video-focalnet_tiny.pth --output_dir=converted/k400_tiny [--labels=k400.txt]
    # an ImageNet FocalNet-SRF checkpoint into a Video-FocalNet of the config
    python main.py convert --pth=focalnet_tiny_srf.pth --imagenet --output_dir=converted/init \
        --config=configs/k400_tiny.py
    # back to PyTorch (official key names)
    python main.py convert --checkpoint=converted/k400_tiny --to_torch=model.safetensors

The architecture fields that the weights determine (embed_dim, depths, focal
levels and windows, patch and tubelet size, layerscale, post-LN in the
modulation, MLP ratio, number of classes) are read from the state dict, and a
`--variant` or `--config.model` that says otherwise is an error naming what
the weights are. The rest (num_frames, use_postln, normalize_modulator) and the
clip and preprocessing written into the model card come from the config (the
official recipe when none is given).
"""
from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from vfocal_jax import artifacts, config_fields, errors, model_card, params_io, paths
from vfocal_jax.convert.torch_pickle import load_torch_checkpoint

__all__ = ["run", "infer_model_kwargs", "convert_state_dict", "VariantMismatchError"]

# Fields of the weights that name a variant.
_VARIANT_KEYS = ("embed_dim", "depths")


class VariantMismatchError(errors.MismatchError):
  """``--variant`` / ``--config.model`` disagree with the shapes of the weights."""


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


def variant_of(fields: Mapping[str, Any]) -> str:
  """The named variant whose width and depths ``fields`` have, else ``'custom'``."""
  from vfocal_jax.models import VARIANTS  # pylint: disable=import-outside-toplevel
  for name, spec in VARIANTS.items():
    if spec and all(tuple(np.atleast_1d(spec[k])) == tuple(np.atleast_1d(fields.get(k, ()))) for k in _VARIANT_KEYS):
      return name
  return "custom"


def resolve_model_kwargs(config: ml_collections.ConfigDict, variant: str | None, inferred: dict[str, Any], *,
                         check_model: bool) -> dict[str, Any]:
  """The model to convert into: the weights' fields over ``--variant`` / the config's, which must agree."""
  base = dict(config.model.to_dict()) if "model" in config else {}
  if variant:
    base = {k: v for k, v in base.items() if k in artifacts.RUNTIME_FIELDS or k in ("num_frames",)}
    base["variant"] = variant
  told = {f: getattr(artifacts.build_model(ml_collections.ConfigDict({"model": base})), f) for f in inferred}
  what = f"Video-FocalNet-{variant_of(inferred)} " if variant_of(inferred) != "custom" else ""
  weights = ", ".join(f"{k}={v!r}" for k, v in inferred.items() if k in _VARIANT_KEYS + ("num_classes",))
  if (variant and variant != "custom") or (check_model and not variant):  # custom: whatever the weights are.
    wrong = [f"{k}={told[k]!r} (the weights have {v!r})" for k, v in inferred.items()
             if not model_card._same(tuple(told[k]) if isinstance(told[k], list) else told[k], v)  # pylint: disable=protected-access
             and (variant is None or k in _VARIANT_KEYS)]
    if wrong:
      if variant:
        fix = (f"--variant={variant_of(inferred)}" if variant_of(inferred) != "custom"
               else "no --variant (the architecture is read from the weights)")
      else:
        fix = "a config of that architecture, or no --config (the architecture is read from the weights)"
      source = f"--variant={variant}" if variant else "--config.model"
      raise VariantMismatchError(f"{source} does not match the weights: {'; '.join(wrong)}. The weights are a "
                                 f"{what}({weights}): use {fix}.")
  kwargs = {**base, **inferred}
  kwargs["variant"] = variant_of(inferred) if not variant else variant
  return kwargs


def convert_state_dict(state_dict: Mapping[str, np.ndarray], *, model_kwargs: dict[str, Any],
                       allow_partial: bool = False, imagenet: bool = False,
                       seed: int = 0) -> tuple[Any, Any]:
  """Maps an official state dict onto `create_model(**model_kwargs)`.

  Returns:
    `(variables, report)`; report is None for a complete load.
  """
  from vfocal_jax.convert import mapping  # pylint: disable=import-outside-toplevel
  model = artifacts.build_model(ml_collections.ConfigDict({"model": dict(model_kwargs)}))
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


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with paths.resolve(path).open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _to_torch(config: ml_collections.ConfigDict, to_torch: str, source: str | None) -> None:
  from vfocal_jax.convert.safetensors_io import flax_to_torch  # pylint: disable=import-outside-toplevel
  if not source:
    raise errors.FlagError("convert --to_torch=FILE.safetensors needs --checkpoint=CONVERTED_DIR "
                           "(from `main.py convert --pth`) or --workdir=TRAINING_WORKDIR")
  from vfocal_jax import resolve  # pylint: disable=import-outside-toplevel
  loaded = resolve.artifact(resolve.UserConfig(config), checkpoint=source)
  tensors = flax_to_torch({"params": loaded.params}, loaded.model, to_torch,
                          metadata={"format": "pt", "source": str(paths.resolve(source))})
  print(f"Wrote {len(tensors)} tensors ({sum(v.size for v in tensors.values()):,} parameters) "
        f"with the official key names to {to_torch}")
  print("  PyTorch: model.load_state_dict(safetensors.torch.load_file(path))")


def run(*, config: ml_collections.ConfigDict, pth: str | None = None, output_dir: str | None = None,
        variant: str | None = None, to_torch: str | None = None, checkpoint: str | None = None,
        workdir: str | None = None, allow_partial: bool = False, imagenet: bool = False,
        labels: str | None = None, check_model: bool = False) -> str | None:
  """The `convert` command (see the module doc); errors say which flag fixes them.

  ``config`` gives the clip, views and preprocessing of the card; with
  ``check_model`` (the user named the config) its model must also be the
  weights', else the architecture is read from the weights.

  Returns the converted checkpoint's path (None for ``--to_torch``).
  """
  if to_torch:
    _to_torch(config, to_torch, checkpoint or workdir)
    return None
  if not pth:
    raise errors.FlagError("convert needs --pth=FILE.pth (and --output_dir=DIR), "
                           "or --to_torch=FILE.safetensors with --checkpoint=DIR")
  if not paths.resolve(pth).is_file():
    raise errors.MissingFileError(f"--pth={pth}")
  if not output_dir:
    raise errors.FlagError("convert --pth needs --output_dir=DIR for the converted checkpoint")
  if variant and variant not in ("tiny", "small", "base", "custom"):
    raise errors.FlagError(f"--variant={variant!r}: expected tiny, small, base or custom")

  print(f"Reading {pth} (no torch import, nothing from the file is executed)")
  state_dict = load_torch_checkpoint(pth)
  inferred = infer_model_kwargs(state_dict, with_head=not (imagenet or allow_partial))
  if imagenet:  # The video fields (frames, tubelet, classes) come from the config.
    inferred = {k: v for k, v in inferred.items() if k not in ("tubelet_size",)}
  model_kwargs = resolve_model_kwargs(config, variant, inferred, check_model=check_model and not imagenet)
  print(f"  model: {model_kwargs}")
  from vfocal_jax.convert import mapping  # pylint: disable=import-outside-toplevel
  try:
    variables, report = convert_state_dict(
        state_dict, model_kwargs=model_kwargs, allow_partial=allow_partial, imagenet=imagenet)
  except mapping.CheckpointMismatchError:
    print(f"{pth} does not match the model above. If it is an ImageNet FocalNet-SRF checkpoint, add "
          "--imagenet; to load what matches and initialise the rest, add --allow_partial.", file=sys.stderr)
    raise
  if report is not None:
    print("Partial load report:")
    _print_report(report)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
  config = config_fields.updated(config, {"model": ml_collections.ConfigDict(model_kwargs)}, new_fields=True)
  model = artifacts.build_model(config)
  class_names = None
  if labels:
    from vfocal_jax.predict import read_class_names  # pylint: disable=import-outside-toplevel
    class_names = read_class_names(labels, int(model.num_classes))
  card = model_card.card_from_config(
      config, model, class_names=class_names,
      provenance={"kind": "imagenet_init" if imagenet else "converted", "source": str(paths.resolve(pth)),
                  "sha256": _sha256(pth), "partial": bool(report is not None)})
  path = params_io.save_params(output_dir, variables["params"], card)
  print(f"Wrote {num_params:,} parameters to {path} (Orbax params/ + {model_card.CARD_FILE})")
  print(f"  use it with: --checkpoint={path}")
  return path
