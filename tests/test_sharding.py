"""Mesh construction and partition rules (no model needed)."""
import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from vfocal_jax import sharding


def test_resolve_mesh_shape():
  assert sharding.resolve_mesh_shape((-1, 1), 8) == (8, 1)
  assert sharding.resolve_mesh_shape((2, -1), 8) == (2, 4)
  assert sharding.resolve_mesh_shape((4, 2), 8) == (4, 2)
  for bad in [(3, -1), (4, 4), (-1, -1), (8,)]:
    with pytest.raises(ValueError):
      sharding.resolve_mesh_shape(bad, 8)


def test_mesh_has_auto_axes_over_all_devices():
  mesh = sharding.create_mesh((-1, 2))
  assert mesh.axis_names == ("data", "model")
  assert dict(mesh.shape) == {"data": jax.device_count() // 2, "model": 2}
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_partition_rules():
  mesh = sharding.create_mesh((4, 2))
  spec = lambda path, shape, **kw: sharding.spec_for(path, shape, mesh, **kw)
  # Kernels: output features / channels on 'model' when they divide.
  assert spec("layers_0/blocks_0/mlp/fc1/kernel", (96, 384)) == P(None, "model")
  assert spec("layers_0/blocks_0/modulation/focal_layers_0/kernel", (3, 3, 1, 96)) == P(None, None, None, "model")
  assert spec("head/kernel", (768, 5)) == P(None, None)      # 5 does not split over 2
  assert spec("layers_0/blocks_0/norm1/scale", (96,)) == P(None)
  assert spec("layers_0/blocks_0/mlp/fc1/bias", (384,)) == P(None)
  # FSDP: the largest remaining dividing axis also over 'data'.
  assert spec("layers_0/blocks_0/mlp/fc1/kernel", (96, 384), fsdp=True, fsdp_min_size=0) == P("data", "model")
  assert spec("layers_0/blocks_0/mlp/fc1/bias", (384,), fsdp=True, fsdp_min_size=0) == P("data")
  assert spec("layers_0/blocks_0/mlp/fc1/bias", (384,), fsdp=True, fsdp_min_size=10_000) == P(None)
  # Optimizer-state leaves mirror their parameter's path.
  tree = {"params": {"fc": {"kernel": np.zeros((8, 16))}}, "opt_state": [{"trace": {"fc": {"kernel": np.zeros((8, 16))}}}],
          "step": np.zeros((), np.int32)}
  shard = sharding.state_shardings(tree, mesh)
  assert shard["params"]["fc"]["kernel"].spec == shard["opt_state"][0]["trace"]["fc"]["kernel"].spec == P(None, "model")
  assert shard["step"].spec == P()


def test_global_batch_is_split_over_data():
  mesh = sharding.create_mesh((4, 2))
  x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  arr = sharding.global_batch({"x": x}, mesh)["x"]
  assert arr.sharding.spec == P("data", None)
  np.testing.assert_array_equal(np.asarray(arr), x)
