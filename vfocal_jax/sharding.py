"""One device mesh ``('data', 'model')`` and the rules that place arrays on it.

* The batch is split over ``'data'`` (and replicated over ``'model'``).
* Parameters (and the optimizer state that mirrors them) follow partition
  rules keyed on their path, ``layers_0/blocks_1/modulation/f/kernel``: by
  default every kernel puts its last (output-feature / output-channel) axis on
  ``'model'`` when that axis divides evenly; everything else is replicated.
* With FSDP, the largest remaining axis that divides evenly is also split over
  ``'data'`` (ZeRO-3 style; XLA inserts the all-gathers).

The mesh uses ``AxisType.Auto`` axes: ``jax.make_mesh`` now defaults to
Explicit axes, which reject the GSPMD-style mix of shardings used here.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from vfocal_jax import errors

DATA, MODEL = "data", "model"

# (regex on the '/'-joined path, axis to put on 'model' or None). First match wins.
DEFAULT_RULES: tuple[tuple[str, int | None], ...] = (
    (r"(^|/)kernel$", -1),  # Dense (in, out), Conv (..., in, out): output features.
    (r".*", None),          # Biases, norms, layer-scale gammas, scalars: replicated.
)


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, int]:
  """Replaces one ``-1`` in ``mesh_shape`` by the rest of the devices; checks the product."""
  shape = [int(s) for s in mesh_shape]
  if len(shape) != 2:
    raise errors.ConfigError(f"mesh_shape must have 2 entries (data, model), got {tuple(mesh_shape)}")
  if shape.count(-1) > 1:
    raise errors.ConfigError(f"mesh_shape {tuple(mesh_shape)}: at most one -1")
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    if num_devices % known:
      raise errors.ConfigError(f"mesh_shape {tuple(mesh_shape)} does not divide {num_devices} devices")
    shape[shape.index(-1)] = num_devices // known
  if int(np.prod(shape)) != num_devices:
    raise errors.ConfigError(f"mesh_shape {tuple(shape)} needs {int(np.prod(shape))} devices, have {num_devices}")
  return tuple(shape)


def create_mesh(mesh_shape: Sequence[int] = (-1, 1), devices: Sequence[Any] | None = None) -> Mesh:
  """A ``Mesh(('data', 'model'))`` over ``devices`` (default: all devices of all hosts)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_shape, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))


def path_to_str(path: tuple[Any, ...]) -> str:
  """'/'-joined names of a ``jax.tree_util`` key path."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    else:
      parts.append(str(k))
  return "/".join(parts)


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, *, rules=DEFAULT_RULES, fsdp: bool = False,
             fsdp_min_size: int = 2 ** 14) -> P:
  """The PartitionSpec of one array from the rules, the mesh and its shape."""
  shape = tuple(shape)
  axes: list[Any] = [None] * len(shape)
  model_size, data_size = mesh.shape[MODEL], mesh.shape[DATA]
  for pattern, dim in rules:
    if re.search(pattern, path):
      if dim is not None and len(shape) >= 2 and model_size > 1:
        d = dim % len(shape)
        if shape[d] % model_size == 0:
          axes[d] = MODEL
      break
  if fsdp and data_size > 1 and int(np.prod(shape, dtype=np.int64)) >= fsdp_min_size:
    free = [d for d in range(len(shape)) if axes[d] is None and shape[d] % data_size == 0]
    if free:
      d = max(free, key=lambda i: (shape[i], i))
      axes[d] = DATA
  return P(*axes)


def state_shardings(abstract_state: Any, mesh: Mesh, *, rules=DEFAULT_RULES, fsdp: bool = False,
                    fsdp_min_size: int = 2 ** 14) -> Any:
  """NamedShardings for every leaf of a (train-state) pytree, from its paths and shapes.

  Optimizer-state leaves (momentum, Adam moments) carry the path of their
  parameter as a suffix, so they get the same placement as the parameter.
  """
  def one(path, leaf):
    return NamedSharding(mesh, spec_for(path_to_str(path), np.shape(leaf), mesh, rules=rules,
                                        fsdp=fsdp, fsdp_min_size=fsdp_min_size))
  return jax.tree_util.tree_map_with_path(one, abstract_state)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) axis over ``'data'``; the rest whole."""
  return NamedSharding(mesh, P(DATA, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Builds global arrays from this process's piece of the batch (split over ``'data'``).

  Every process passes its own rows; the global batch is their concatenation
  in process order (``jax.make_array_from_process_local_data``).
  """
  out = {}
  for name, x in local_batch.items():
    x = np.asarray(x)
    if x.ndim == 0:
      continue
    sharding = batch_sharding(mesh, x.ndim)
    out[name] = jax.make_array_from_process_local_data(sharding, x)
  return out


def to_host(tree: Any) -> Any:
  """NumPy values of replicated (or fully addressable) arrays, on every process."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.sharding.is_fully_replicated:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)
  return jax.tree.map(one, tree)
