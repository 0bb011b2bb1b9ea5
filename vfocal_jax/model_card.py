"""The model card: what it takes to use a model, stored beside its weights.

Every artifact we write (a converted checkpoint, a training workdir) carries a
``model_card.json``: the architecture, the clip (frames, tubelet, image size),
the preprocessing of the evaluation views (short side, mean/std, sampling,
test clips x crops), the class names in order, and where the weights came
from (a ``.pth`` and its sha256, or a run and its step). This is timm's
``pretrained_cfg`` for video: eval, predict, visualize and fine-tuning read it,
so nobody has to remember which flags a model needs.

The card is a flat map from config field paths (``image_size``,
``model.embed_dim``, ``data.mean`` ...) to values, so applying it to a config
and comparing it with one are the same few lines for every field.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections

from vfocal_jax import config_fields, errors, file_checks, paths
from vfocal_jax.file_checks import BadFileError

__all__ = ["CARD_FILE", "ARCHITECTURE_FIELDS", "CLIP_FIELDS", "PREPROCESSING_FIELDS", "ModelCard",
           "CardMismatchError", "BadFileError", "card_from_config", "architecture_of", "apply_card", "check_fields",
           "read_card", "write_card"]

CARD_FILE = "model_card.json"
FORMAT = "vfocal_jax.model_card/1"

# VideoFocalNet fields that decide the parameters or the function they compute.
# The rest (artifacts.RUNTIME_FIELDS: dtype, remat, the kernels' layouts, drop
# rates, ...) are how a run computes, not what the model is: they come from the config.
ARCHITECTURE_FIELDS = ("embed_dim", "depths", "focal_levels", "focal_windows", "mlp_ratio", "use_layerscale",
                       "layerscale_value", "use_postln", "use_postln_in_modulation", "normalize_modulator",
                       "num_frames", "tubelet_size", "patch_size", "num_classes", "use_conv_embed", "design",
                       "temporal_conv")
# Config fields of the clip and of the evaluation views.
CLIP_FIELDS = ("num_frames", "image_size")
PREPROCESSING_FIELDS = ("data.mean", "data.std", "data.eval_resize_ratio", "data.sampling", "data.frame_interval",
                        "data.eval_clip_offsets", "test_num_clips", "test_num_crops")


class CardMismatchError(errors.MismatchError):
  """A config disagrees with the model card of the artifact it is used with."""


@dataclasses.dataclass
class ModelCard:
  """``fields``: config path -> value; ``class_names``; ``provenance``: where the weights came from."""
  fields: dict[str, Any]
  class_names: list[str] | None = None
  provenance: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def num_classes(self) -> int:
    return int(self.fields["model.num_classes"])

  def model_fields(self) -> dict[str, Any]:
    """The architecture as ``create_model`` keyword arguments (lists as tuples)."""
    return {k.split(".", 1)[1]: _tuples(v) for k, v in self.fields.items() if k.startswith("model.")}

  def to_json(self) -> dict[str, Any]:
    return {"format": FORMAT, "fields": _jsonable(self.fields), "class_names": self.class_names,
            "provenance": _jsonable(self.provenance)}

  @classmethod
  def from_json(cls, value: Any, source: str = "") -> "ModelCard":
    """A card from its JSON value, every known field checked (``BadFileError`` names the file and the field)."""
    source = source or "model card"
    value = file_checks.mapping(value, source)
    if value.get("format") != FORMAT or not isinstance(value.get("fields"), dict):
      raise BadFileError(source, f"not a {FORMAT} card (format={value.get('format')!r:.60}, "
                                 f"fields {'present' if isinstance(value.get('fields'), dict) else 'missing'})")
    fields = {str(k): _tuples(v) for k, v in value["fields"].items()}
    check_fields(fields, source)
    names = value.get("class_names")
    if names is not None:
      names = list(file_checks.strings(names, source, "class_names", max_len=1_000_000))
      if "model.num_classes" in fields and len(names) != fields["model.num_classes"]:
        raise BadFileError(source, f"class_names has {len(names)} names for a model.num_classes="
                                   f"{fields['model.num_classes']} head")
    provenance = value.get("provenance")
    return cls(fields=fields, class_names=names,
               provenance=dict(file_checks.mapping(provenance, source, "provenance")) if provenance else {})


def check_fields(fields: Mapping[str, Any], source: str) -> None:
  """Types and bounds of the card's known fields, and the ones that must agree (unknown fields pass)."""
  fc, src = file_checks, source
  ints = {"model.embed_dim": (1, 1 << 16), "model.num_frames": (1, 4096), "model.tubelet_size": (1, 4096),
          "model.patch_size": (1, 256), "model.num_classes": (1, 1 << 20), "num_frames": (1, 4096),
          "image_size": (32, 8192), "data.frame_interval": (1, 4096), "test_num_clips": (1, 1024),
          "test_num_crops": (1, 3)}
  bools = ("model.use_layerscale", "model.use_postln", "model.use_postln_in_modulation",
           "model.normalize_modulator", "model.use_conv_embed")
  choices = {"model.design": ("parallel", "spatial_only", "sequential", "joint3d"),
             "model.temporal_conv": ("dense", "depthwise"), "data.sampling": ("segment", "dense"),
             "data.eval_clip_offsets": ("uniform", "random")}
  for key, (lo, hi) in ints.items():
    if key in fields:
      fc.integer(fields[key], src, key, lo=lo, hi=hi)
  for key in bools:
    if key in fields:
      fc.boolean(fields[key], src, key)
  for key, options in choices.items():
    if key in fields:
      fc.choice(fields[key], src, key, options)
  for key in ("model.mlp_ratio", "data.eval_resize_ratio"):
    if key in fields:
      fc.number(fields[key], src, key, positive=True, hi=64)
  if "model.layerscale_value" in fields:
    fc.number(fields["model.layerscale_value"], src, "model.layerscale_value")
  if "data.mean" in fields:
    fc.numbers(fields["data.mean"], src, "data.mean", length=3, lo=-1e4, hi=1e4)
  if "data.std" in fields:
    fc.numbers(fields["data.std"], src, "data.std", length=3, positive=True, hi=1e4)
  stages = [k for k in ("model.depths", "model.focal_levels", "model.focal_windows") if k in fields]
  for key in stages:
    fc.integers(fields[key], src, key, lo=0 if key != "model.focal_windows" else 1, hi=256, max_len=16)
  if len({len(fields[k]) for k in stages}) > 1:
    lengths = ", ".join(f"{k} {len(fields[k])}" for k in stages)
    raise BadFileError(src, f"the stage lists differ in length ({lengths}); each needs one value per stage")
  if "image_size" in fields and fields["image_size"] % 32:
    raise BadFileError(src, f"image_size is {fields['image_size']}, expected a multiple of 32")
  frames, tubelet = fields.get("model.num_frames"), fields.get("model.tubelet_size")
  if frames and tubelet and frames % tubelet:
    raise BadFileError(src, f"model.num_frames={frames} is not divisible by model.tubelet_size={tubelet}")


def _tuples(value: Any) -> Any:
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _jsonable(value: Any) -> Any:
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # NumPy scalars.
    return value.item()
  return value


def architecture_of(model: Any) -> dict[str, Any]:
  """``{'model.FIELD': value}`` of a built VideoFocalNet, for the architecture fields."""
  return {f"model.{name}": _tuples(list(v)) if isinstance(v := getattr(model, name), (list, tuple)) else v
          for name in ARCHITECTURE_FIELDS}


def card_from_config(config: ml_collections.ConfigDict, model: Any, *, class_names: Iterable[str] | None = None,
                     provenance: Mapping[str, Any] | None = None) -> ModelCard:
  """The card of ``model`` used with ``config``'s clip and evaluation preprocessing."""
  fields = architecture_of(model)
  fields["model.variant"] = "custom"
  for path in CLIP_FIELDS + PREPROCESSING_FIELDS:
    fields[path] = _tuples(config_fields.get(config, path))
  missing = sorted(p for p, v in fields.items() if v is None)
  if missing:
    raise ValueError(f"Cannot write a model card: the config has no {', '.join(missing)}.")
  names = list(class_names) if class_names else None
  if names is not None and len(names) != int(model.num_classes):
    raise errors.MismatchError(f"{len(names)} class names for a {model.num_classes}-class model")
  return ModelCard(fields=fields, class_names=names, provenance=dict(provenance or {}))


def _same(a: Any, b: Any) -> bool:
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  if isinstance(a, float) or isinstance(b, float):
    try:
      return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)))
    except (TypeError, ValueError):
      return False
  return a == b


def apply_card(config: ml_collections.ConfigDict, card: ModelCard, *, config_given: bool,
               overrides: Iterable[str] = (), fields: Iterable[str] | None = None, source: str = "",
               resolved: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """A copy of ``config`` (its lock kept) with the card's fields, or an error naming each field that disagrees.

  Args:
    config: the user's config (or the default one when ``config_given`` is False).
    card: the artifact's card.
    config_given: the user chose ``config`` (``--config=FILE``): a field of it
      that differs from the card is then a mistake, unless overridden.
    overrides: field paths the user set explicitly (``--config.FIELD=VALUE``):
      these keep the config's value.
    fields: which card fields to apply (default: all).
    source: the artifact, named in errors.
    resolved: the config's effective values where they differ from what the
      config spells out (the architecture of ``create_model(**config.model)``,
      which fills fields from the variant).
  """
  overrides = set(overrides)
  wanted = list(card.fields) if fields is None else [f for f in fields if f in card.fields]
  updates, mismatches = {}, []
  for path in wanted:
    value = card.fields[path]
    if path == "model.variant":
      continue
    current = (resolved or {}).get(path, config_fields.get(config, path))
    if path in overrides:
      continue
    if config_given and current is not None and not _same(current, value):
      mismatches.append(f"{path}: the config says {current!r}, the model card says {value!r}")
      continue
    updates[path] = value
  if mismatches:
    flags = " ".join(f"--config.{m.split(':')[0]}=..." for m in mismatches[:3])
    raise CardMismatchError(
        f"The config disagrees with the model card of {source or 'the checkpoint'}: " + "; ".join(mismatches)
        + f". Drop --config to use the card, or override explicitly ({flags}).")
  if "model" in config and "variant" in config.model and any(p.startswith("model.") for p in wanted):
    updates["model.variant"] = "custom"  # Every architecture field now comes from the card.
  return config_fields.updated(config, updates, new_fields=True)


def read_card(directory: paths.PathLike) -> ModelCard | None:
  """The card in ``directory``, or None when it has none."""
  path = paths.resolve(directory) / CARD_FILE
  if not path.exists():
    return None
  return ModelCard.from_json(paths.read_json(path), source=str(path))


def write_card(directory: paths.PathLike, card: ModelCard) -> str:
  return paths.write_json(paths.resolve(directory) / CARD_FILE, card.to_json())
