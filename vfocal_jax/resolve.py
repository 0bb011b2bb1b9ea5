"""Where a run becomes concrete: what the user typed in, one resolved config and artifact out.

The command line (``cli.py``) calls these once per command; the library
functions they feed (``evaluate``, ``predict``, ``visualize``, ``export``)
take the result, a ``artifacts.Loaded``: the model, its host parameters, its
card and the config to run with, with the card's fields applied and checked.
Whether the user chose the config (``--config=...``) and which fields they set
(``--config.FIELD=...``) matter only here: a field of a chosen config that
disagrees with the card is an error naming it, a field set explicitly wins.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import ml_collections
from absl import logging

from vfocal_jax import artifacts, config_fields, errors, model_card, workdir_config

__all__ = ["UserConfig", "artifact", "evaluation", "exported"]


@dataclasses.dataclass(frozen=True)
class UserConfig:
  """The config as the command line gave it.

  Attributes:
    config: the parsed config (the demo's or the packaged default when none was named).
    given: ``--config`` named it: a field that differs from an artifact's card is then a mistake.
    overrides: the fields set with ``--config.FIELD=VALUE``: these win over a card.
  """
  config: ml_collections.ConfigDict | None = None
  given: bool = False
  overrides: frozenset[str] = frozenset()


def _with_card(user: UserConfig, card: model_card.ModelCard, source: str,
               fields: Iterable[str] | None = None) -> ml_collections.ConfigDict:
  """The user's config with the card's fields; runtime model fields stay the config's."""
  config = user.config if user.config is not None else ml_collections.ConfigDict()
  resolved = {}
  if "model" in config:
    try:
      resolved = model_card.architecture_of(artifacts.build_model(config))
    except errors.ConfigError:  # Not a buildable model config: compare the fields as spelled out.
      resolved = {}
  out = model_card.apply_card(config, card, config_given=user.given, overrides=user.overrides, fields=fields,
                              source=source, resolved=resolved)
  if "model" in out:  # Keep only the runtime fields the config sets; the card owns the rest.
    with out.unlocked():
      for key in list(out.model.keys()):
        if f"model.{key}" not in card.fields and key not in artifacts.RUNTIME_FIELDS:
          del out.model[key]
  return out


def artifact(user: UserConfig, *, checkpoint: str | None = None, workdir: str | None = None,
             step: int | None = None) -> artifacts.Loaded:
  """The model, host parameters, card and config of a converted checkpoint (``checkpoint``) or a workdir.

  ``checkpoint`` may also be a workdir; it wins over ``workdir``.
  """
  source = checkpoint or workdir
  if not source:
    raise errors.FlagError("give --checkpoint (a converted checkpoint) or --workdir (a training run)")
  card = artifacts.read_card(source, user.config)
  config = _with_card(user, card, source)
  params, step = artifacts.load_params(source, step)
  if step is not None:
    card = dataclasses.replace(card, provenance={**card.provenance, "step": int(step)})
  model = artifacts.build_model(config)
  artifacts.check_params(model, params, config, source=source)
  logging.info("Loaded %s: %d frames x %dpx, %d classes, %s.", source, model.num_frames, config.image_size,
               model.num_classes, card.provenance)
  return artifacts.Loaded(model=model, params=params, card=card, config=config, source=str(source))


def evaluation(user: UserConfig, *, checkpoint: str | None = None, workdir: str | None = None
               ) -> artifacts.Loaded:
  """``artifact``; without eval data in the config, a workdir is evaluated on the split its run used."""
  loaded = artifact(user, checkpoint=checkpoint, workdir=None if checkpoint else workdir)
  config = loaded.config
  if not checkpoint and not config.data.eval_shards and not config.data.tfds_name:
    data = workdir_config.read_config(workdir).data
    config = config_fields.updated(config, {"data": data})
    loaded = dataclasses.replace(loaded, config=config)
  return loaded


def exported(user: UserConfig, directory: str) -> artifacts.Loaded:
  """An ``export`` directory (verified against its card), with the config its card's clip and views give.

  Its ``params`` are None: the weights are inside the exported model.
  """
  from vfocal_jax import export  # pylint: disable=import-outside-toplevel
  model = export.load(directory)
  card = model_card.ModelCard.from_json(model.card, source=directory)
  config = _with_card(user, card, directory, fields=model_card.CLIP_FIELDS + model_card.PREPROCESSING_FIELDS)
  return artifacts.Loaded(model=model, params=None, card=card, config=config, source=f"{directory} (exported)")
