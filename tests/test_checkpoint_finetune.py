"""Fine-tuning from a checkpoint with another class count keeps the fresh head."""
import numpy as np

from vfocal_jax import train


def test_load_pretrained_reinitialises_mismatched_head():
  fresh = {"stem": {"kernel": np.zeros((4, 8))}, "head": {"kernel": np.full((8, 5), 7.0), "bias": np.full(5, 7.0)},
           "new_layer": {"scale": np.ones(3)}}
  pretrained = {"stem": {"kernel": np.ones((4, 8))}, "head": {"kernel": np.ones((8, 400)), "bias": np.ones(400)},
                "unused": {"kernel": np.ones(2)}}
  merged, reinit = train.load_pretrained(fresh, pretrained)
  np.testing.assert_array_equal(merged["stem"]["kernel"], 1.0)
  np.testing.assert_array_equal(merged["head"]["kernel"], 7.0)
  np.testing.assert_array_equal(merged["head"]["bias"], 7.0)
  assert sorted(reinit) == ["head/bias", "head/kernel", "new_layer/scale"]
