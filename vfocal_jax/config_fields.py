"""Config fields by dotted path (``model.embed_dim``), the one home for reading, setting and copying them.

``updated`` is how a resolved config gains fields (the class count from the
data, the card's clip): a deep copy keeps the lock, so a misspelt field stays
an error after it, where ``ConfigDict(config.to_dict())`` would drop it.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import ml_collections

__all__ = ["get", "set_", "updated"]


def get(config: Mapping[str, Any] | ml_collections.ConfigDict, path: str, default: Any = None) -> Any:
  """The value at ``path``, or ``default`` when a part of it is missing."""
  node: Any = config
  for part in path.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      return default
    node = node[part]
  return node


def set_(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
  """Sets ``path`` in place, creating missing parents (on an unlocked config); tuples are stored as lists."""
  *parents, leaf = path.split(".")
  node = config
  for part in parents:
    if part not in node:
      node[part] = ml_collections.ConfigDict()
    node = node[part]
  node[leaf] = list(value) if isinstance(value, tuple) else value


def updated(config: ml_collections.ConfigDict, fields: Mapping[str, Any], *, new_fields: bool = False
            ) -> ml_collections.ConfigDict:
  """A copy of ``config`` with ``{path: value}`` set; ``config`` is left as it was.

  The copy keeps ``config``'s lock: a path that is not a field is an error
  naming it, unless ``new_fields`` (a card's field the config does not have).
  """
  out = copy.deepcopy(config)
  if new_fields:
    with out.unlocked():
      for path, value in fields.items():
        set_(out, path, value)
  else:
    for path, value in fields.items():
      set_(out, path, value)
  return out
