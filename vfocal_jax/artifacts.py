"""From any artifact to a running model: one path for every command.

An artifact is a config (a model to initialise), a converted checkpoint
(``params/`` + ``model_card.json``, written by ``convert``) or a training
workdir (``checkpoints/`` + ``config.json`` + ``model_card.json``). This
module holds what every command needs of one: the model of a config, fresh or
abstract parameters, the card, the parameters by artifact kind and the check
that they fit. ``resolve.artifact`` puts them together into a ``Loaded``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from vfocal_jax import config_fields, errors, model_card, paths, workdir_config
from vfocal_jax.model_card import ModelCard

__all__ = ["Loaded", "ParamsMismatchError", "model_kwargs", "build_model", "model_from_fields", "artifact_kind",
           "read_card", "load_params", "check_params", "init_params", "abstract_params"]

# Model fields that say how a run computes (the config's to choose), not what the model is.
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "remat_policy", "depthwise_impl", "temporal_layout",
                  "layer_norm_impl", "focal_projection", "drop_rate", "drop_path_rate", "dense_init")


class ParamsMismatchError(errors.MismatchError):
  """Parameters that do not fit the model they are loaded into (lists what differs)."""


@dataclasses.dataclass
class Loaded:
  """A model, its parameters (host arrays; None for an exported model, which holds them), its card and the
  config to feed it with."""
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
        raise errors.ConfigError(f"model.{key}={kwargs[key]!r} is not a dtype (use float32, bfloat16 or float16)"
                                 ) from e
  return kwargs


def build_model(config: ml_collections.ConfigDict, **fields: Any):
  """The VideoFocalNet of ``config.model`` (``fields`` replace some of its fields)."""
  return model_from_fields(config.model, **fields)


def model_from_fields(model_config: Mapping[str, Any] | ml_collections.ConfigDict, **fields: Any):
  """The VideoFocalNet of a model config (``config.model``, or its JSON), with ``fields`` replacing some.

  A field the model does not take, or a value it refuses, is a ``ConfigError`` naming it.
  """
  from vfocal_jax.models import create_model  # pylint: disable=import-outside-toplevel
  try:
    return create_model(**{**model_kwargs(model_config or {}), **fields})
  except (TypeError, ValueError) as e:
    if isinstance(e, errors.UserError):
      raise
    raise errors.ConfigError(f"config.model: {e}") from e


def init_params(model, rng: jax.Array, num_frames: int, image_size: int) -> Any:
  """Fresh parameters of ``model`` for clips of ``num_frames`` x ``image_size``^2, as one jitted program.

  (Run eagerly, the init dispatches one small compiled program per operation: about 400 for a tiny model.)
  """
  def init(rng):
    video = jnp.zeros((1, num_frames, image_size, image_size, 3), jnp.float32)
    return model.init({"params": rng}, video, train=False)["params"]
  return jax.jit(init)(rng)


def abstract_params(model, num_frames: int, image_size: int) -> Any:
  """The shapes and dtypes of ``model``'s parameters (``jax.ShapeDtypeStruct``s), without computing them."""
  return jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0), num_frames, image_size))


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
  fields = workdir_config.read_legacy_model_fields(root)
  logging.warning("%s has no %s (written by an older version): clip and preprocessing come from the config.",
                  root, model_card.CARD_FILE)
  config = config_fields.updated(config, {"model": ml_collections.ConfigDict(fields)}, new_fields=True)
  return model_card.card_from_config(config, build_model(config), provenance={"source": str(root)})


def read_card(path: paths.PathLike, config: ml_collections.ConfigDict | None = None) -> ModelCard:
  """The card of a converted checkpoint or workdir (a legacy one is completed from ``config``)."""
  root = paths.resolve(path)
  if artifact_kind(root) is None:
    raise errors.MissingFileError(
        root, "neither a converted checkpoint (params/) nor a training workdir (checkpoints/); make one "
        "with `main.py convert --pth=FILE.pth --output_dir=DIR` or `main.py train --workdir=DIR`.")
  card = model_card.read_card(root)
  return card if card is not None else _legacy_card(root, config or ml_collections.ConfigDict())


def load_params(source: paths.PathLike, step: int | None = None) -> tuple[Any, int | None]:
  """Host parameters of a converted checkpoint, or of a workdir's latest (or ``step``) checkpoint, and that step."""
  if artifact_kind(source) == "converted":
    from vfocal_jax import params_io  # pylint: disable=import-outside-toplevel
    return params_io.load_params(source), None
  from vfocal_jax import checkpoints  # pylint: disable=import-outside-toplevel
  return checkpoints.load_params_from_workdir(source, step)


def check_params(model, params: Any, config: ml_collections.ConfigDict, *, source: str = "") -> None:
  """Raises ``ParamsMismatchError`` listing what differs between ``params`` and ``model``'s parameters."""
  expected = abstract_params(model, int(config.num_frames), int(config.image_size))
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
