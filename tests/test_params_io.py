"""The converted-checkpoint format (Orbax params + model.json) round-trips exactly."""
import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from vfocal_jax import params_io


def _params():
  rng = np.random.default_rng(0)
  return {
      "patch_embed": {"proj": {"kernel": rng.standard_normal((4, 4, 3, 8)).astype(np.float32),
                               "bias": rng.standard_normal(8).astype(np.float32)}},
      "layers_0": {"blocks_1": {"gamma_1": rng.standard_normal(8).astype(ml_dtypes.bfloat16)}},
      "head": {"kernel": rng.standard_normal((8, 5)).astype(np.float64)},
  }


def test_round_trip_bit_exact_with_kwargs(tmp_path):
  params = _params()
  kwargs = {"variant": "custom", "embed_dim": 8, "depths": (1, 1, 2, 1), "num_classes": 5,
            "dtype": jnp.bfloat16, "use_layerscale": True, "layerscale_value": 1e-4}
  params_io.save_params(tmp_path / "ck", params, kwargs)
  assert params_io.is_converted_checkpoint(tmp_path / "ck")
  stored = json.loads((tmp_path / "ck" / "model.json").read_text())
  assert stored["depths"] == [1, 1, 2, 1] and stored["dtype"] == "bfloat16"

  loaded, loaded_kwargs = params_io.load_params(tmp_path / "ck")
  assert loaded_kwargs == {**kwargs, "dtype": "bfloat16"}
  flat_in = {("patch_embed", "proj", "kernel"): params["patch_embed"]["proj"]["kernel"],
             ("patch_embed", "proj", "bias"): params["patch_embed"]["proj"]["bias"],
             ("layers_0", "blocks_1", "gamma_1"): params["layers_0"]["blocks_1"]["gamma_1"],
             ("head", "kernel"): params["head"]["kernel"]}
  for path, want in flat_in.items():
    got = loaded
    for k in path:
      got = got[k]
    assert isinstance(got, np.ndarray) and got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def test_refuses_overwrite_and_explains_missing(tmp_path):
  params_io.save_params(tmp_path / "ck", _params(), {"variant": "tiny"})
  with pytest.raises(FileExistsError):
    params_io.save_params(tmp_path / "ck", _params(), {"variant": "tiny"})
  with pytest.raises(FileNotFoundError, match="main.py convert"):
    params_io.load_params(tmp_path / "nothing")
  with pytest.raises(ValueError, match="'params' collection"):
    params_io.save_params(tmp_path / "ck2", {"params": _params()}, {"variant": "tiny"})
