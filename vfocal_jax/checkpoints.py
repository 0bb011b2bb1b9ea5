"""Orbax checkpoints of the train state and of the input iterator's position.

Layout: ``workdir/checkpoints/<step>/{state,data,loop}`` through one
``ocp.CheckpointManager`` (asynchronous saves; the latest ``keep`` steps plus the
``keep_best`` best by eval top-1 are kept). ``state`` is the train state as a
plain nested dict (``flax.serialization.to_state_dict``), so its ``params``
entry can be read without knowing the optimizer; it restores onto any mesh
(Orbax reshards it onto the target's shardings). ``data`` holds one file per
process written by the input iterator's own ``save(path)``: restoring both
with the same process count puts a resumed run at the same batch with the
same rng. Beside them ``data/position.json`` holds the global count of
examples consumed, from which another process count resumes near the same
place (``restore_data``; docs/cloud.md, "Resuming on a slice of another
size"). ``loop`` is a small
JSON of the loop's own state (the partial window of logged metrics), so a
resumed run logs the same windows as an uninterrupted one.

A save that fails (a full disk: ``OSError(ENOSPC)`` from the synchronous part
or from the background commit) becomes one ``CheckpointWriteError`` naming the
directory and the last committed step, which stays intact.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import serialization
from orbax.checkpoint import checkpoint_managers as cm

from vfocal_jax import errors, file_checks, paths

CHECKPOINT_DIR = "checkpoints"


class CheckpointWriteError(errors.UserError, OSError):
  """A checkpoint could not be written (e.g. the disk is full); the previous one is intact."""


# --- The input iterator as an Orbax item (one file per process, one global position). ---------

POSITION_FILE = "position.json"


@dataclasses.dataclass(frozen=True)
class DataRestore:
  """How the input position came back: ``exact`` (True), approximately (False) or not at all (None)."""
  exact: bool | None
  detail: str
  saved_process_count: int | None = None
  saved_device_count: int | None = None


# position.json's counts: the least each may be. Larger than 10**15 is not a count we wrote.
_POSITION_COUNTS = {"examples_consumed": 0, "global_batch": 1, "epoch_size": 0, "skipped_at_start": 0,
                    "process_count": 1, "device_count": 1}


def read_position(path: paths.PathLike) -> dict[str, Any]:
  """``data/position.json`` of a checkpoint, checked; ``{}`` when there is none (checkpoints written before it).

  Its counts are integers (``examples_consumed``, ``epoch_size``,
  ``skipped_at_start`` >= 0; ``global_batch``, ``process_count``,
  ``device_count`` >= 1) or null, ``state_saved`` is true/false. A damaged
  file is a ``BadFileError`` naming it and the field: the input position it
  holds decides which examples a resumed run sees, so it is never guessed.
  """
  target = epath.Path(path)
  if not target.exists():
    return {}
  name = os.fspath(target)
  position = dict(file_checks.mapping(file_checks.parse_json(paths.read_bytes(target), name), name))
  for key, lo in _POSITION_COUNTS.items():
    if position.get(key) is not None:
      file_checks.integer(position[key], name, key, lo=lo, hi=10 ** 15)
  if position.get("state_saved") is not None:
    file_checks.boolean(position["state_saved"], name, "state_saved")
  return position


def _process_file(process_index: int, process_count: int) -> str:
  return f"process_{process_index}-of-{process_count}"


def _saved_process_count(directory: epath.Path, position: dict[str, Any]) -> int | None:
  """The process count that wrote ``directory``: from its position file, else from its state files' names."""
  if position.get("process_count"):
    return int(position["process_count"])
  counts = {p.name.split("-of-")[1].split(".")[0] for p in directory.glob("process_*-of-*")}
  return int(counts.pop()) if len(counts) == 1 and next(iter(counts)).isdigit() else None


def restore_data(directory: epath.Path, item: Any, process_index: int, process_count: int) -> DataRestore:
  """Moves ``item`` to the position saved in ``directory``, by this process of ``process_count``.

  The saved state of this process (``process_<i>-of-<n>``, written by the
  same process count) restores exactly. Without it (another process count,
  or ``data.checkpoint_iterator=False``) an item with ``restore_position``
  resumes near the saved global count of examples (``position.json``);
  anything else starts from the beginning. Never raises for a missing state.
  """
  position = read_position(directory / POSITION_FILE)
  saved_processes = _saved_process_count(directory, position)
  result = functools.partial(DataRestore, saved_process_count=saved_processes,
                             saved_device_count=position.get("device_count"))
  own = directory / _process_file(process_index, process_count)
  if any(p.name == own.name or p.name.startswith(own.name + ".") for p in directory.iterdir()):
    if hasattr(item, "restore_position"):  # First: it may rebuild the stream that the state fits.
      item.restore_position(position, exact=True)
    try:
      item.restore(os.fspath(own))
    except Exception as e:  # pylint: disable=broad-except
      if not _is_read_error(e):
        raise
      cause = " ".join(str(e).split())[:300] or type(e).__name__
      raise errors.BadFileError(own, f"the input iterator's saved state cannot be read ({type(e).__name__}: "
                                     f"{cause}); the file may be truncated or written by another pipeline") from e
    return result(True, "the saved state of this host's iterator")
  why = (f"no iterator state for process {process_index} of {process_count} "
         f"(saved by {saved_processes or 'an unknown number of'} process(es))")
  if position.get("state_saved") is False:
    why = "the iterator state was not saved (data.checkpoint_iterator=False)"
  if not hasattr(item, "restore_position"):
    return result(None, f"{why}; this iterator cannot move, it starts from the beginning")
  moved, detail = item.restore_position(position, exact=False)
  return result(False if moved else None, f"{why}; {detail}")


def _is_read_error(error: BaseException) -> bool:
  """Whether restoring an iterator's state failed on the file (tf's errors, a bad value, I/O), not in our code."""
  return (isinstance(error, (OSError, ValueError, EOFError, IndexError, KeyError))
          or type(error).__module__.startswith("tensorflow"))


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves/restores an iterator that has ``save(path)`` / ``restore(path)`` (e.g. clu's).

  Each process writes its exact state to ``process_<i>-of-<n>``; process 0
  also writes ``position.json`` from the iterator's ``position()`` (when it
  has one) plus the process and device counts, for a restore by another
  process count (``restore_data``). ``restore`` returns a ``DataRestore``.
  """

  def save(self, directory: epath.Path, args: "DataIteratorSave") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    args.item.save(os.fspath(directory / _process_file(jax.process_index(), jax.process_count())))
    if jax.process_index() == 0 and hasattr(args.item, "position"):
      position = dict(args.item.position(), process_count=jax.process_count(), device_count=jax.device_count())
      (directory / POSITION_FILE).write_text(json.dumps(position))

  def restore(self, directory: epath.Path, args: "DataIteratorRestore") -> DataRestore:
    return restore_data(directory, args.item, jax.process_index(), jax.process_count())


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
  return ocp.CheckpointManager(paths.resolve(workdir) / CHECKPOINT_DIR, options=options,
                               handler_registry=_handler_registry())


# Orbax's replica-parallel save (on by default except on GPU) cuts every replicated shard
# into one slice per replica so that each host writes a part. Each cut is a small XLA
# program per (shape, sharding, device), all compiled at the first save: 376 compiles,
# about 10 s, for the 8-device test model. Cutting only pays for big shards, so shards
# under 1 MiB are written whole by their first replica (the on-disk format is the same).
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """The manager's items: the state (PyTree of arrays), the iterator position, the loop's JSON."""
  scalars = ocp.type_handlers.ScalarHandler()
  types = ocp.type_handlers.create_type_handler_registry(
      (int, scalars), (float, scalars), (bytes, scalars), (np.number, scalars),
      (np.ndarray, ocp.type_handlers.NumpyHandler()),
      (jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)),
      (str, ocp.type_handlers.StringHandler()))
  state = ocp.PyTreeCheckpointHandler(type_handler_registry=types)
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for item, handler, save, restore in [("state", state, ocp.args.PyTreeSave, ocp.args.PyTreeRestore),
                                        ("data", DataIteratorHandler(), DataIteratorSave, DataIteratorRestore),
                                        ("loop", ocp.JsonCheckpointHandler(), ocp.args.JsonSave, ocp.args.JsonRestore)]:
    registry.add(item, save, handler)
    registry.add(item, restore, handler)
  return registry


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any = None, *,
         metrics: dict[str, float] | None = None, force: bool = False,
         loop_state: dict[str, Any] | None = None, previous_step: int | None = None) -> bool:
  """Saves ``state`` (the iterator position, the loop's JSON state) at ``step``; returns whether it saved.

  ``previous_step`` (the save still in flight, if any) only names it when its commit failed.

  Raises:
    CheckpointWriteError: this save, or the background commit of the previous
      one, failed (the message names the last committed step).
  """
  items = {"state": ocp.args.PyTreeSave(serialization.to_state_dict(state))}
  if _checkpointable(data_iterator):
    items["data"] = DataIteratorSave(data_iterator)
  if loop_state is not None:
    items["loop"] = ocp.args.JsonSave(loop_state)
  try:
    manager.wait_until_finished()  # The previous save's failure is that save's, not this one's.
  except Exception as e:  # pylint: disable=broad-except
    raise write_error(manager, e, previous_step) from e
  try:
    return manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)
  except Exception as e:  # pylint: disable=broad-except
    raise write_error(manager, e, step) from e


def wait_until_finished(manager: ocp.CheckpointManager, step: int | None = None) -> None:
  """Waits for the background commit (of ``step``); a failed one raises ``CheckpointWriteError``."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise write_error(manager, e, step) from e


def check_for_errors(manager: ocp.CheckpointManager, step: int | None = None) -> None:
  """Raises ``CheckpointWriteError`` if the background commit (of ``step``) already failed (does not wait)."""
  try:
    manager.check_for_errors()
  except Exception as e:  # pylint: disable=broad-except
    raise write_error(manager, e, step) from e


def committed_steps(directory: paths.PathLike) -> list[int]:
  """Steps whose checkpoint has committed in ``directory`` (``workdir/checkpoints``), read from storage.

  Uncommitted saves live in ``<step>.orbax-checkpoint-tmp*`` directories
  (removed at the next start) and are not listed.
  """
  directory = epath.Path(directory)
  if not directory.exists():
    return []
  steps = [p for p in directory.iterdir() if p.name.isdigit() and p.is_dir()]
  return sorted(int(p.name) for p in steps if ocp.path.step.is_path_finalized(p))


def describe_latest(directory: paths.PathLike) -> str:
  """``'the last checkpoint (step N in DIR) is intact'`` or ``'no checkpoint was written yet (DIR)'``."""
  try:
    steps = committed_steps(directory)
  except OSError as e:
    return f"the checkpoints in {directory} could not be listed ({e})"
  if not steps:
    return f"no checkpoint was written yet ({directory} has none)"
  return f"the last checkpoint (step {steps[-1]} in {directory}) is intact"


def write_error(manager: ocp.CheckpointManager, error: BaseException, step: int | None = None) -> CheckpointWriteError:
  """One line for a failed save: what failed, why, and which checkpoint is still there."""
  cause = " ".join(str(error).split()) or type(error).__name__
  if len(cause) > 300:
    cause = cause[:300] + "..."
  what = f"checkpoint step {step}" if step is not None else "a checkpoint"
  errno = getattr(error, "errno", None)
  hint = " (free space there, or point --workdir elsewhere, then rerun to resume)" if errno == 28 else \
      " (rerun to resume)"
  out = CheckpointWriteError(f"could not write {what} in {manager.directory}: {cause}; "
                             f"{describe_latest(manager.directory)}{hint}")
  out.errno = errno
  return out


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any, data_iterator: Any = None,
                   step: int | None = None) -> Any | None:
  """Restores the latest (or given) step into the structure/shardings of ``abstract_state``.

  ``abstract_state`` is a state whose leaves are ``jax.ShapeDtypeStruct`` with
  shardings (the restored arrays land there, whatever mesh saved them). The
  iterator, if given and saved, is moved to the saved position: exactly by
  the process count that saved it, approximately by another one
  (``restore_data``). One log line says which. Returns None if there is
  nothing to restore.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  target = serialization.to_state_dict(abstract_state)
  items = {"state": ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))}
  saved = manager.item_metadata(step)
  has_data = saved is not None and "data" in saved and saved["data"] is not None
  if _checkpointable(data_iterator) and (has_data or _has_data_dir(manager, step)):
    items["data"] = DataIteratorRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  logging.info("%s", describe_restore(step, manager.directory, restored["data"] if "data" in items else None,
                                      jax.process_count(), jax.device_count()))
  return serialization.from_state_dict(abstract_state, restored["state"])


def describe_restore(step: int, directory: Any, data: DataRestore | None, process_count: int,
                     device_count: int) -> str:
  """The one log line of a restore: what came back exactly, what approximately, what not."""
  head = f"Restored checkpoint step {step} from {directory}"
  if data is not None and data.saved_process_count and data.saved_device_count:
    mesh = (f"saved by {data.saved_process_count} process(es) on {data.saved_device_count} devices, "
            f"restored by {process_count} on {device_count}")
  else:
    mesh = f"restored by {process_count} process(es) on {device_count} devices"
  if data is None:
    return f"{head}. Exact: the train state (step {step}; {mesh}). No input position was saved or asked for."
  if data.exact:
    return f"{head}. Exact: the train state (step {step}) and the input position ({mesh})."
  if data.exact is None:
    return f"{head}. Exact: the train state (step {step}; {mesh}). Not restored: the input position ({data.detail})."
  return (f"{head}. Exact: the train state (step {step}; {mesh}). "
          f"Approximate: the input position ({data.detail}).")


LOOP_FILE = "metadata"  # The file ocp.JsonCheckpointHandler writes in ``<step>/loop``.


def read_loop_state(manager: ocp.CheckpointManager, step: int) -> dict[str, Any] | None:
  """The loop's JSON state saved at ``step``, checked (None for checkpoints written without one).

  A damaged one (unreadable, or a metrics window whose numbers do not fit)
  is not used: a warning names the file and says what is assumed (the open
  metrics window starts empty, so the first report after the resume averages
  only the steps after ``step``), and None comes back. It holds nothing else.
  """
  directory = epath.Path(manager.directory) / str(step) / "loop"
  if not directory.exists():
    return None
  path = directory / LOOP_FILE
  try:
    return check_loop_state(paths.read_json(path), os.fspath(path))
  except errors.UserError as e:
    logging.warning("%s; the open metrics window is not carried over: the first metrics reported after the "
                    "resume average only the steps after step %d.", e, step)
    return None


def check_loop_state(value: Any, path: str) -> dict[str, Any]:
  """The loop state ``{"window": {"num_steps": N, "sums": ...}}``: a ``BadFileError`` unless each number fits.

  ``sums`` must have exactly the entries of ``metrics.TrainMetrics`` (float
  totals within float32, integer counts within int32); ``num_steps`` >= 0.
  """
  fc = file_checks
  state = dict(fc.mapping(value, path))
  if state.get("window") is None:
    return state
  window = fc.mapping(state["window"], path, "window")
  fc.integer(window.get("num_steps"), path, "window.num_steps", lo=0, hi=10 ** 12)
  if window.get("sums") is not None:
    from vfocal_jax import metrics  # pylint: disable=import-outside-toplevel
    template = serialization.to_state_dict(metrics.TrainMetrics.empty())
    _check_like(window["sums"], template, path, "window.sums")
  return state


def _check_like(value: Any, template: Any, path: str, field: str) -> None:
  """``value`` has ``template``'s entries (nested dicts) and numbers of its leaves' kinds."""
  fc = file_checks
  if isinstance(template, dict):
    value = fc.mapping(value, path, field)
    if set(value) != set(template):
      missing, extra = sorted(set(template) - set(value)), sorted(set(value) - set(template))
      raise fc.BadFileError(path, f"{field} has " + "; ".join(
          p for p in (f"no {', '.join(missing)}" if missing else "",
                      f"unknown entries {', '.join(map(repr, extra[:5]))}" if extra else "") if p))
    for key in template:
      _check_like(value[key], template[key], path, f"{field}.{key}")
  elif np.issubdtype(np.asarray(template).dtype, np.integer):
    fc.integer(value, path, field, lo=0, hi=np.iinfo(np.int32).max)
  else:
    fc.number(value, path, field, lo=-3.0e38, hi=3.0e38)


def _has_data_dir(manager: ocp.CheckpointManager, step: int) -> bool:
  return (epath.Path(manager.directory) / str(step) / "data").exists()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of ``tree`` carrying ``shardings`` (a restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


# --- Params for eval / predict / visualize. --------------------------------------------------------

def load_params_from_workdir(workdir: paths.PathLike, step: int | None = None) -> tuple[Any, int]:
  """The parameters of the latest (or given) checkpoint of a training workdir, and its step.

  Parameters come back as host-local arrays (one device), whatever mesh they
  were saved from.
  """
  manager = create_manager(workdir, read_only=True, async_save=False)
  step = manager.latest_step() if step is None else step
  manager.close()
  if step is None:
    raise errors.MissingFileError(manager.directory, "no checkpoint in it yet: train first, or give --checkpoint")
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
