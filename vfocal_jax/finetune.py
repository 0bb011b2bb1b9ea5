"""Starting a run from an artifact: the class count from the data, the weights from a checkpoint.

A run takes its number of classes from its data when the data has a label map
(``labels.txt`` / ``dataset_info.json`` beside the shards, or the tfds
metadata), so fine-tuning a 400-class model on a 10-class folder gets a
10-way head without a flag. The checkpoint's architecture must be the
config's (its model card says what it is); only the head may differ, and it is
then re-initialised, which the log says.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from vfocal_jax import artifacts, config_fields, model_card

__all__ = ["classes_from_data", "check_pretrained", "merge_pretrained"]


def classes_from_data(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, list[str] | None]:
  """``config`` with ``model.num_classes`` from the train data's label map, and the class names.

  Without a label map (or without data, as in tests that feed their own
  batches) the config's count stands and the names are None.
  """
  from vfocal_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  if not (config.data.train_shards or config.data.tfds_name):
    return config, None
  info = input_pipeline.get_dataset_info(config.data, "train")
  names = list(info.label_names) if info.label_names else None
  if names is None:
    return config, None
  if len(names) != int(config.model.num_classes):
    logging.warning("The train data's label map has %d classes: model.num_classes %d -> %d.", len(names),
                    config.model.num_classes, len(names))
    config = config_fields.updated(config, {"model.num_classes": len(names), "data.num_classes": len(names)})
  return config, names


def check_pretrained(config: ml_collections.ConfigDict, source: str) -> None:
  """Checks the converted checkpoint or workdir ``source`` against ``config``'s model, reading only its card.

  Raises:
    model_card.CardMismatchError: an architecture field other than the class
      count differs from the card (the weights would not fit).
  """
  card = artifacts.read_card(source, config)
  fields = [f for f in card.fields if f.startswith("model.") and f != "model.num_classes"]
  resolved = model_card.architecture_of(artifacts.build_model(config))
  model_card.apply_card(config, card, config_given=True, fields=fields, source=source, resolved=resolved)


def merge_pretrained(params: Any, pretrained: Any) -> tuple[Any, list[str]]:
  """Copies ``pretrained`` into ``params`` where paths and shapes agree.

  Entries whose shape differs (a head for another class count) or that the
  checkpoint lacks keep their fresh initialisation; their paths are returned.
  """
  flat = traverse_util.flatten_dict(params, sep="/")
  src = traverse_util.flatten_dict(pretrained, sep="/")
  kept = []
  for key, value in flat.items():
    if key in src and tuple(np.shape(src[key])) == tuple(value.shape):
      flat[key] = jnp.asarray(src[key], value.dtype)
    else:
      kept.append(key)
  return traverse_util.unflatten_dict(flat, sep="/"), kept
