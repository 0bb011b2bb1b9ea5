"""`.pth` -> converted checkpoint -> Flax logits == PyTorch logits; -> safetensors bit for bit."""
import copy
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import numpy as safetensors_numpy

from benchmarks import torch_video_focalnet as tvf  # The repository root is on sys.path (conftest).
from vfocal_jax import model_card, params_io, resolve
from vfocal_jax.configs import default
from vfocal_jax.convert import cli
from vfocal_jax.convert import CheckpointMismatchError, flax_to_torch, torch_to_flax
from vfocal_jax.models import create_model

FRAMES, SIZE = 4, 64
ARCH = dict(embed_dim=16, depths=(1, 1, 2, 1), num_classes=5)


def _torch_model(tubelet, layerscale):
  torch.manual_seed(tubelet)
  model = tvf.VideoFocalNet(num_frames=FRAMES, tubelet_size=tubelet, use_layerscale=layerscale,
                            **ARCH)
  return tvf.randomize_(model, seed=tubelet).eval()


def _config_object(tmp_path):
  """A config object of a module that is gone at load time (like the released yacs CfgNode)."""
  (tmp_path / "gone_cfg_mod.py").write_text("class CfgNode(dict):\n  pass\n")
  sys.path.insert(0, str(tmp_path))
  try:
    import gone_cfg_mod  # pylint: disable=import-outside-toplevel
    cfg = gone_cfg_mod.CfgNode(MODEL={"TYPE": "videofocalnet_custom"})
  finally:
    sys.path.remove(str(tmp_path))
  return cfg


def _save_released_wrapper(model, path):
  """The layout of the released files: model, optimizer state, a config object, scalars."""
  shadow = copy.deepcopy(model).train()  # the optimizer steps a copy: `model` keeps its weights
  opt = torch.optim.SGD(shadow.parameters(), lr=0.1, momentum=0.9)
  shadow(torch.randn(1, FRAMES, 3, SIZE, SIZE)).sum().backward()
  opt.step()
  torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "max_accuracy": 1.0,
              "epoch": 1, "config": _config_object(path.parent)}, path)
  sys.modules.pop("gone_cfg_mod", None)
  (path.parent / "gone_cfg_mod.py").unlink()


def _named(message, torch_key):
  """Whether `message` names the parameter, by its torch key or its Flax path (contract naming)."""
  module = torch_key.rsplit(".", 1)[0]
  flax_path = re.sub(r"\.(\d+)", r"_\1", module).replace(".", "/")
  return module in message or flax_path in message


def _config():
  """The official recipe at this test's clip size (the CLI's config when --config is not given)."""
  config = default.get_config()
  config.num_frames, config.image_size = FRAMES, SIZE
  return config


def _video(seed=0):
  return np.random.default_rng(seed).standard_normal((2, FRAMES, SIZE, SIZE, 3)).astype(np.float32)


def _torch_logits(model, video):
  with torch.no_grad():
    return model(torch.from_numpy(video.transpose(0, 1, 4, 2, 3).copy())).numpy()


@pytest.mark.parametrize("tubelet,layerscale", [(1, False), (2, True)])
def test_pth_to_flax_logits_match_torch_and_back_bit_for_bit(tmp_path, tubelet, layerscale):
  tmodel = _torch_model(tubelet, layerscale)
  pth = tmp_path / "released.pth"
  _save_released_wrapper(tmodel, pth)

  cli.run(config=_config(), pth=str(pth), output_dir=str(tmp_path / "converted"))
  params = params_io.load_params(tmp_path / "converted")
  card = model_card.read_card(tmp_path / "converted")
  assert card.fields["model.tubelet_size"] == tubelet and card.fields["num_frames"] == FRAMES
  assert card.fields["model.use_layerscale"] == layerscale and card.fields["model.embed_dim"] == ARCH["embed_dim"]
  model = resolve.artifact(resolve.UserConfig(), checkpoint=str(tmp_path / "converted")).model

  video = _video()
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
  logits = np.asarray(forward(params, jnp.asarray(video)))
  want = _torch_logits(tmodel, video)
  assert logits.shape == want.shape == (2, ARCH["num_classes"])
  np.testing.assert_allclose(logits, want, rtol=0, atol=5e-5 * max(1.0, np.abs(want).max()))

  # Flax -> safetensors (through the CLI) gives back every tensor bit for bit.
  out = tmp_path / "back.safetensors"
  cli.run(config=_config(), to_torch=str(out), checkpoint=str(tmp_path / "converted"))
  back = safetensors_numpy.load_file(str(out))
  ref = tmodel.state_dict()
  assert sorted(back) == sorted(ref)
  for key, tensor in ref.items():
    want_t = tensor.numpy()
    assert back[key].dtype == want_t.dtype and back[key].shape == want_t.shape, key
    np.testing.assert_array_equal(back[key].view(np.uint8), want_t.view(np.uint8), err_msg=key)

  # ... and the official model loads it strictly.
  fresh = tvf.VideoFocalNet(num_frames=FRAMES, tubelet_size=tubelet, use_layerscale=layerscale,
                            **ARCH).eval()
  fresh.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in back.items()}, strict=True)
  np.testing.assert_array_equal(_torch_logits(fresh, video), want)


def test_flax_to_torch_direct(tmp_path):
  tmodel = _torch_model(1, False)
  state_dict = {k: v.numpy().copy() for k, v in tmodel.state_dict().items()}
  model = create_model("custom", num_frames=FRAMES, **ARCH)
  variables = torch_to_flax(state_dict, model)
  written = flax_to_torch(variables, model, tmp_path / "x.safetensors")
  back = safetensors_numpy.load_file(str(tmp_path / "x.safetensors"))
  assert list(written) and sorted(back) == sorted(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(back[key].view(np.uint8), value.view(np.uint8), err_msg=key)


def test_mismatched_keys_are_listed(tmp_path, capsys):
  tmodel = _torch_model(1, False)
  state_dict = {k: v.numpy().copy() for k, v in tmodel.state_dict().items()}
  missing = "layers.2.blocks.1.modulation.h_temporal.weight"
  reshaped = "layers.1.blocks.0.mlp.fc1.weight"
  unexpected = "layers.0.blocks.0.modulation.extra.weight"
  del state_dict[missing]
  state_dict[reshaped] = state_dict[reshaped][:, :-1]
  state_dict[unexpected] = np.zeros(3, np.float32)
  model = create_model("custom", num_frames=FRAMES, **ARCH)
  with pytest.raises(CheckpointMismatchError) as info:
    torch_to_flax(state_dict, model)
  for key in (missing, reshaped, unexpected):
    assert _named(str(info.value), key), key

  # Through the CLI: refused with a hint; with --allow_partial, loaded with a report.
  torch.save({"model": state_dict}, tmp_path / "bad.pth")
  with pytest.raises(CheckpointMismatchError):
    cli.run(config=_config(), pth=str(tmp_path / "bad.pth"), output_dir=str(tmp_path / "a"))
  assert "--allow_partial" in capsys.readouterr().err
  cli.run(config=_config(), pth=str(tmp_path / "bad.pth"), output_dir=str(tmp_path / "b"),
          allow_partial=True, variant="custom")
  printed = capsys.readouterr().out
  assert "report" in printed.lower() and _named(printed, missing)
  assert params_io.is_converted_checkpoint(tmp_path / "b")


def test_cli_errors_name_the_fix(tmp_path):
  with pytest.raises(ValueError, match="--pth"):
    cli.run(config=_config())
  with pytest.raises(ValueError, match="--output_dir"):
    pth = tmp_path / "x.pth"
    torch.save({"model": {"head.weight": torch.ones(2, 2)}}, pth)
    cli.run(config=_config(), pth=str(pth))
  with pytest.raises(ValueError, match="--checkpoint"):
    cli.run(config=_config(), to_torch=str(tmp_path / "y.safetensors"))
