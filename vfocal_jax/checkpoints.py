"""Orbax checkpoints of the train state and of the input iterator's position.

Layout: ``workdir/checkpoints/<step>/{state,data}`` through one
``ocp.CheckpointManager`` (asynchronous saves; the latest ``keep`` steps plus the
``keep_best`` best by eval top-1 are kept). ``state`` is the train state as a
plain nested dict (``flax.serialization.to_state_dict``), so its ``params``
entry can be read without knowing the optimizer. ``data`` holds one file per
process written by the input iterator's own ``save(path)``: restoring both
puts a resumed run at the same batch with the same rng.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import serialization
from orbax.checkpoint import checkpoint_managers as cm

from vfocal_jax import paths

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"


# --- The input iterator as an Orbax item (one file per process). ------------------------------

class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves/restores an iterator that has ``save(path)`` / ``restore(path)`` (e.g. clu's)."""

  def _path(self, directory: epath.Path) -> str:
    return os.fspath(directory / f"process_{jax.process_index()}-of-{jax.process_count()}")

  def save(self, directory: epath.Path, args: "DataIteratorSave") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    args.item.save(self._path(directory))

  def restore(self, directory: epath.Path, args: "DataIteratorRestore") -> Any:
    args.item.restore(self._path(directory))
    return args.item


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  item: Any


def _checkpointable(iterator: Any) -> bool:
  return iterator is not None and hasattr(iterator, "save") and hasattr(iterator, "restore")


# --- Manager. ----------------------------------------------------------------------------------

def create_manager(workdir: str, *, keep: int = 3, keep_best: int = 1, async_save: bool = True,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager in ``workdir/checkpoints`` keeping the latest ``keep`` and best ``keep_best``."""
  policies = [cm.LatestN(n=max(keep, 1))]
  if keep_best > 0:
    policies.append(cm.BestN(get_metric_fn=lambda m: m["top1"], reverse=False, n=keep_best,
                             keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=cm.AnyPreservationPolicy(policies), create=not read_only,
      enable_async_checkpointing=async_save, read_only=read_only, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(paths.resolve(workdir) / CHECKPOINT_DIR,
                               options=options, item_names=("state", "data"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any = None, *,
         metrics: dict[str, float] | None = None, force: bool = False) -> bool:
  """Saves ``state`` (and the iterator position) at ``step``; returns whether it saved."""
  items = {"state": ocp.args.StandardSave(serialization.to_state_dict(state))}
  if _checkpointable(data_iterator):
    items["data"] = DataIteratorSave(data_iterator)
  return manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any, data_iterator: Any = None,
                   step: int | None = None) -> Any | None:
  """Restores the latest (or given) step into the structure/shardings of ``abstract_state``.

  ``abstract_state`` is a state whose leaves are ``jax.ShapeDtypeStruct`` with
  shardings (the restored arrays land there). The iterator, if given and
  saved, is moved to the saved position. Returns None if there is nothing to restore.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  target = serialization.to_state_dict(abstract_state)
  items = {"state": ocp.args.StandardRestore(target)}
  saved = manager.item_metadata(step)
  has_data = saved is not None and "data" in saved and saved["data"] is not None
  if _checkpointable(data_iterator) and (has_data or _has_data_dir(manager, step)):
    items["data"] = DataIteratorRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  logging.info("Restored checkpoint at step %d from %s.", step, manager.directory)
  return serialization.from_state_dict(abstract_state, restored["state"])


def _has_data_dir(manager: ocp.CheckpointManager, step: int) -> bool:
  return (epath.Path(manager.directory) / str(step) / "data").exists()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of ``tree`` carrying ``shardings`` (a restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


# --- Config next to the checkpoints, and params for eval / predict / visualize. ----------------

def write_config(workdir: paths.PathLike, config: ml_collections.ConfigDict) -> None:
  """Writes ``workdir/config.json`` (process 0)."""
  if jax.process_index() == 0:
    paths.write_text(paths.resolve(workdir) / CONFIG_FILE, config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(workdir: paths.PathLike) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(paths.read_json(paths.resolve(workdir) / CONFIG_FILE))


def load_params_from_workdir(workdir: paths.PathLike, step: int | None = None) -> tuple[Any, int]:
  """The parameters of the latest (or given) checkpoint of a training workdir, and its step.

  Parameters come back as host-local arrays (one device), whatever mesh they
  were saved from.
  """
  manager = create_manager(workdir, read_only=True, async_save=False)
  step = manager.latest_step() if step is None else step
  manager.close()
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {manager.directory}: train first, or give --checkpoint.")
  path = epath.Path(manager.directory) / str(step) / "state"
  with ocp.PyTreeCheckpointer() as checkpointer:
    meta = checkpointer.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    item = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                   dict(tree["params"]))}
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
  return jax.tree.map(np.asarray, restored["params"]), int(step)
