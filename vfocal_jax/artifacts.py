"""From any artifact to a running model: one path for every command.

An artifact is a config (a model to initialise), a converted checkpoint
(``params/`` + ``model_card.json``, written by ``convert``) or a training
workdir (``checkpoints/`` + ``config.json`` + ``model_card.json``). ``load``
turns a converted checkpoint or a workdir into ``(model, params, card,
config)``: the architecture, clip and preprocessing come from the card, the
run's own settings (data, batch, mesh, compute dtype) from the config, and a
config the user chose that disagrees with the card is an error naming the field.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from vfocal_jax import errors, model_card, paths
from vfocal_jax.model_card import ModelCard

__all__ = ["Loaded", "ParamsMismatchError", "model_kwargs", "build_model", "artifact_kind", "read_card", "load",
           "check_params", "init_params"]

# Model fields that say how a run computes (the config's to choose), not what the model is.
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "depthwise_impl", "temporal_layout", "drop_rate", "drop_path_rate",
                  "dense_init")


class ParamsMismatchError(errors.MismatchError):
  """Parameters that do not fit the model they are loaded into (lists what differs)."""


@dataclasses.dataclass
class Loaded:
  """A model, its parameters (host arrays), its card and the config to feed it with."""
  model: Any
  params: Any
  card: ModelCard
  config: ml_collections.ConfigDict
  source: str


def model_kwargs(model_config: Mapping[str, Any] | ml_collections.ConfigDict) -> dict[str, Any]:
  """``config.model`` (a ConfigDict, or JSON) as ``create_model`` arguments.

  Lists become tuples, dtype names dtypes, and fields left None take the variant's value.
  """
  kwargs = dict(model_config.to_dict() if hasattr(model_config, "to_dict") else model_config)
  kwargs = {k: v for k, v in kwargs.items() if v is not None}  # None: the variant's value.
  for key, value in list(kwargs.items()):
    if isinstance(value, list):
      kwargs[key] = tuple(value)
  for key in ("dtype", "param_dtype"):
    if isinstance(kwargs.get(key), str):
      try:
        kwargs[key] = jnp.dtype(kwargs[key])
      except TypeError as e:
        raise ValueError(f"model.{key}={kwargs[key]!r} is not a dtype (use float32, bfloat16 or float16).") from e
  return kwargs


def build_model(config: ml_collections.ConfigDict):
  """The VideoFocalNet of ``config.model``."""
  from vfocal_jax.models import create_model  # pylint: disable=import-outside-toplevel
  return create_model(**model_kwargs(config.model))


def init_params(model, rng: jax.Array, num_frames: int, image_size: int) -> Any:
  """Fresh parameters of ``model`` for clips of ``num_frames`` x ``image_size``^2, as one jitted program.

  (Run eagerly, the init dispatches one small compiled program per operation: about 400 for a tiny model.)
  """
  def init(rng):
    video = jnp.zeros((1, num_frames, image_size, image_size, 3), jnp.float32)
    return model.init({"params": rng}, video, train=False)["params"]
  return jax.jit(init)(rng)


def artifact_kind(path: paths.PathLike) -> str | None:
  """``'converted'`` (params/), ``'workdir'`` (checkpoints/), or None."""
  root = paths.resolve(path)
  if (root / "params").exists():
    return "converted"
  if (root / "checkpoints").exists():
    return "workdir"
  return None


def _legacy_card(root: Any, config: ml_collections.ConfigDict) -> ModelCard:
  """A card for artifacts written before cards: the architecture they recorded, the rest from ``config``."""
  if (root / "model.json").exists():
    fields = paths.read_json(root / "model.json")
  elif (root / "config.json").exists():
    fields = paths.read_json(root / "config.json").get("model", {})
  else:
    raise FileNotFoundError(f"{root}: no {model_card.CARD_FILE}, model.json or config.json.")
  logging.warning("%s has no %s (written by an older version): clip and preprocessing come from the config.",
                  root, model_card.CARD_FILE)
  config = ml_collections.ConfigDict(config.to_dict())
  config.model = ml_collections.ConfigDict(fields)
  return model_card.card_from_config(config, build_model(config), provenance={"source": str(root)})


def read_card(path: paths.PathLike, config: ml_collections.ConfigDict | None = None) -> ModelCard:
  """The card of a converted checkpoint or workdir (a legacy one is completed from ``config``)."""
  root = paths.resolve(path)
  if artifact_kind(root) is None:
    raise FileNotFoundError(
        f"{root} is neither a converted checkpoint (params/) nor a training workdir (checkpoints/); make one "
        "with `main.py convert --pth=FILE.pth --output_dir=DIR` or `main.py train --workdir=DIR`.")
  card = model_card.read_card(root)
  return card if card is not None else _legacy_card(root, config or ml_collections.ConfigDict())


def configure(config: ml_collections.ConfigDict, card: ModelCard, *, config_given: bool,
              overrides: Iterable[str] = (), fields: Iterable[str] | None = None,
              source: str = "") -> ml_collections.ConfigDict:
  """``config`` with the card's fields (see ``model_card.apply_card``); runtime model fields stay the config's."""
  resolved = {}
  if "model" in config:
    try:
      resolved = model_card.architecture_of(build_model(config))
    except (TypeError, ValueError):  # Not a buildable model config: compare as spelled out.
      resolved = {}
  out = model_card.apply_card(config, card, config_given=config_given, overrides=overrides, fields=fields,
                              source=source, resolved=resolved)
  if "model" in out:  # Keep only the runtime fields the config sets; the card owns the rest.
    for key in list(out.model.keys()):
      if f"model.{key}" not in card.fields and key not in RUNTIME_FIELDS:
        del out.model[key]
  return out


def load(config: ml_collections.ConfigDict | None, *, checkpoint: str | None = None, workdir: str | None = None,
         config_given: bool = False, overrides: Iterable[str] = (), step: int | None = None) -> Loaded:
  """The model, host parameters, card and effective config of a converted checkpoint or a workdir.

  Args:
    config: the config to run with (data, batch, mesh, dtype); None: an empty one.
    checkpoint: a converted checkpoint, or a workdir (wins over ``workdir``).
    workdir: a training workdir (its latest checkpoint, or ``step``).
    config_given: the user chose ``config``; fields that differ from the card are then errors.
    overrides: field paths the user set explicitly; they win over the card.
  """
  source = checkpoint or workdir
  if not source:
    raise ValueError("Give --checkpoint (a converted checkpoint) or --workdir (a training run).")
  config = ml_collections.ConfigDict(config.to_dict() if config is not None else {})
  card = read_card(source, config)
  config = configure(config, card, config_given=config_given, overrides=overrides, source=source)
  if artifact_kind(source) == "converted":
    from vfocal_jax import params_io  # pylint: disable=import-outside-toplevel
    params = params_io.load_params(source)
  else:
    from vfocal_jax import checkpoints  # pylint: disable=import-outside-toplevel
    params, step = checkpoints.load_params_from_workdir(source, step)
    card = dataclasses.replace(card, provenance={**card.provenance, "step": int(step)})
  model = build_model(config)
  check_params(model, params, config, source=source)
  logging.info("Loaded %s: %d frames x %dpx, %d classes, %s.", source, model.num_frames, config.image_size,
               model.num_classes, card.provenance)
  return Loaded(model=model, params=params, card=card, config=config, source=os.fspath(source))


def check_params(model, params: Any, config: ml_collections.ConfigDict, *, source: str = "") -> None:
  """Raises ``ParamsMismatchError`` listing what differs between ``params`` and ``model``'s parameters."""
  expected = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0), int(config.num_frames),
                                                int(config.image_size)))
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(expected, sep="/").items()}
  have = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  shapes = sorted(f"{k}: expected {want[k]}, found {have[k]}" for k in set(want) & set(have) if want[k] != have[k])
  if missing or unexpected or shapes:
    def listing(name, items):
      return f"{name} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}" if items else ""
    parts = [p for p in (listing("shape differs", shapes), listing("missing", missing),
                         listing("unexpected", unexpected)) if p]
    raise ParamsMismatchError(f"The parameters of {source or 'the checkpoint'} do not fit the model "
                              f"(embed_dim={model.embed_dim}, depths={tuple(model.depths)}, "
                              f"num_classes={model.num_classes}): " + "; ".join(parts))
