"""The torch-free `.pth` loader against real files written by `torch.save`."""
import collections
import io
import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import torch  # a plain import: a broken install fails, never skips

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import torch_video_focalnet as tvf  # noqa: E402
from vfocal_jax.convert.torch_pickle import (  # noqa: E402
    CheckpointFormatError, CheckpointLoadError, InertObject, UnsafeCheckpointError,
    load_torch_checkpoint, read_torch_file)


def _np(t: "torch.Tensor") -> np.ndarray:
  """The tensor's exact bytes as NumPy (bfloat16 as raw uint16)."""
  t = t.detach().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(np.uint16)
  return t.numpy()


def _bits(a: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _assert_bit_exact(got: np.ndarray, ref: "torch.Tensor", key: str) -> None:
  want = _np(ref)
  assert got.shape == want.shape, key
  assert got.dtype.itemsize == want.dtype.itemsize, key
  np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=key)


def _throwaway_object(tmp_path: pathlib.Path):
  """An instance of a class whose module will be gone when the file is loaded (like yacs)."""
  mod_dir = tmp_path / "throwaway_pkg"
  mod_dir.mkdir()
  (mod_dir / "throwaway_cfg_mod.py").write_text(
      "class CfgNode(dict):\n"
      "  def __init__(self, *a, **k):\n"
      "    super().__init__(*a, **k)\n"
      "    self.__dict__['frozen'] = True\n"
      "class Plain:\n"
      "  def __init__(self):\n"
      "    self.lr = 0.01\n")
  sys.path.insert(0, str(mod_dir))
  try:
    import throwaway_cfg_mod  # pylint: disable=import-outside-toplevel
    cfg = throwaway_cfg_mod.CfgNode(MODEL={"TYPE": "videofocalnet_tiny"}, SEED=0)
    plain = throwaway_cfg_mod.Plain()
  finally:
    sys.path.remove(str(mod_dir))
  return cfg, plain, "throwaway_cfg_mod", mod_dir


@pytest.fixture(scope="module")
def tiny_torch_model():
  torch.manual_seed(0)
  model = tvf.VideoFocalNet(embed_dim=8, depths=(1, 1, 2, 1), num_frames=4, num_classes=7,
                            use_layerscale=True)
  return tvf.randomize_(model, seed=1)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_released_wrapper_yields_every_tensor_bit_exact(tmp_path, tiny_torch_model, legacy):
  model = tiny_torch_model
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
  model(torch.randn(1, 4, 3, 32, 32)).sum().backward()
  opt.step()
  cfg, plain, mod_name, mod_dir = _throwaway_object(tmp_path)
  path = tmp_path / "ckpt.pth"
  torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "config": cfg,
              "other": plain, "max_accuracy": 12.5, "epoch": 3}, path,
             _use_new_zipfile_serialization=not legacy)
  # The class's module is gone at load time.
  del sys.modules[mod_name]
  for f in mod_dir.iterdir():
    f.unlink()
  with pytest.raises(ImportError):
    __import__(mod_name)

  state_dict = load_torch_checkpoint(path)
  ref = model.state_dict()
  assert list(state_dict) == list(ref)
  for key, tensor in ref.items():
    _assert_bit_exact(state_dict[key], tensor, key)

  tree = read_torch_file(path)
  assert isinstance(tree["config"], InertObject)
  assert tree["config"].items["MODEL"] == {"TYPE": "videofocalnet_tiny"}
  assert tree["other"].state == {"lr": 0.01}
  assert tree["max_accuracy"] == 12.5 and tree["epoch"] == 3
  momenta = tree["optimizer"]["state"]
  ref_momenta = opt.state_dict()["state"]
  assert sorted(momenta) == sorted(ref_momenta)
  for i, st in ref_momenta.items():
    _assert_bit_exact(momenta[i]["momentum_buffer"], st["momentum_buffer"], f"momentum {i}")


def test_bare_state_dict_with_module_prefix(tmp_path, tiny_torch_model):
  ref = tiny_torch_model.state_dict()
  torch.save(collections.OrderedDict(("module." + k, v) for k, v in ref.items()), tmp_path / "b.pth")
  state_dict = load_torch_checkpoint(tmp_path / "b.pth")
  assert list(state_dict) == list(ref)
  for key, tensor in ref.items():
    _assert_bit_exact(state_dict[key], tensor, key)


def test_dtypes_views_and_shared_storages(tmp_path):
  base = torch.randn(4, 5, 6)
  tensors = {
      "permuted_slice": base.permute(2, 0, 1)[1:, :, 2:],
      "transposed": base[0].t(),
      "step": torch.arange(10)[::3],
      "scalar_bf16": torch.tensor(3.25, dtype=torch.bfloat16),
      "bf16": torch.randn(3, 4).to(torch.bfloat16),
      "fp16": torch.randn(3, 4).half(),
      "fp64": torch.randn(2, dtype=torch.float64),
      "bool": torch.tensor([True, False, True]),
      "int8": torch.tensor([-3, 4], dtype=torch.int8),
      "empty": torch.zeros(0, 3),
      "param": torch.nn.Parameter(torch.randn(2, 2)),
  }
  torch.save(tensors, tmp_path / "v.pth")
  got = load_torch_checkpoint(tmp_path / "v.pth")
  for key, tensor in tensors.items():
    _assert_bit_exact(got[key].view(np.uint16) if tensor.dtype == torch.bfloat16 else got[key],
                      tensor, key)
  assert str(got["bf16"].dtype) == "bfloat16"


class _Shell:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


class _Eval:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (eval, (f"open({str(self.marker)!r}, 'w')",))


class _Popen:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (subprocess.Popen, (["touch", str(self.marker)],))


@pytest.mark.parametrize("payload,name", [(_Shell, "system"), (_Eval, "eval"), (_Popen, "Popen")])
@pytest.mark.parametrize("protocol", [1, 2])
def test_pickle_that_calls_code_is_refused(tmp_path, payload, name, protocol):
  marker = tmp_path / "MARKER"
  path = tmp_path / "evil.pth"
  torch.save({"model": {"w": torch.ones(2)}, "config": payload(marker)}, path,
             pickle_protocol=protocol)
  with pytest.raises(UnsafeCheckpointError, match=name):
    load_torch_checkpoint(path)
  assert not marker.exists()


def test_plain_pickle_refused_without_running(tmp_path):
  marker = tmp_path / "MARKER"
  path = tmp_path / "plain.pkl"
  path.write_bytes(pickle.dumps(_Shell(marker)))
  with pytest.raises(UnsafeCheckpointError, match="system"):
    load_torch_checkpoint(path)
  assert not marker.exists()


def test_not_a_checkpoint(tmp_path):
  (tmp_path / "junk.pth").write_bytes(b"definitely not a pickle")
  with pytest.raises(CheckpointFormatError, match="not a PyTorch checkpoint"):
    load_torch_checkpoint(tmp_path / "junk.pth")
  torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "nosd.pth")
  with pytest.raises(CheckpointFormatError, match="no state dict"):
    load_torch_checkpoint(tmp_path / "nosd.pth")


def test_view_out_of_bounds_is_an_error(tmp_path):
  path = tmp_path / "v.pth"
  torch.save({"w": torch.arange(6.0)}, path)
  with zipfile.ZipFile(path) as z:
    members = [(i.filename, z.read(i)) for i in z.infolist()]
  # size (6,) -> (7,): the view now reads one element past its storage.
  members = [(n, d.replace(b"K\x06\x85", b"K\x07\x85", 1) if n.endswith("data.pkl") else d)
             for n, d in members]
  with zipfile.ZipFile(path, "w") as z:
    for name, data in members:
      z.writestr(name, data)
  with pytest.raises(CheckpointFormatError, match="reads element 6 of a storage of 6") as info:
    load_torch_checkpoint(path)
  assert str(path) in str(info.value)


def test_errors_name_the_file_and_are_value_errors(tmp_path):
  path = tmp_path / "junk.pth"
  path.write_bytes(b"\x80\x02" + b"(" * 10)
  with pytest.raises(CheckpointLoadError) as info:
    load_torch_checkpoint(path)
  assert isinstance(info.value, ValueError) and isinstance(info.value, pickle.UnpicklingError)
  assert str(info.value).startswith(f"{path}: ")
  with pytest.raises(FileNotFoundError):
    load_torch_checkpoint(tmp_path / "missing.pth")


_GS_READER = r"""
import json, sys
import numpy as np
from vfocal_jax.convert.torch_pickle import CheckpointLoadError, load_torch_checkpoint
out = {}
for url in sys.argv[1:]:
  try:
    sd = load_torch_checkpoint(url)
    out[url] = {k: np.asarray(v, np.float64).round(6).tolist() for k, v in sd.items()}
  except CheckpointLoadError as e:
    out[url] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def test_gs_urls_through_epath(tmp_path):
  """zip, legacy and a hostile file in a bucket of the loopback Cloud Storage emulator."""
  import json  # pylint: disable=import-outside-toplevel
  from gcs_emulator import GcsEmulator, run_python  # pylint: disable=import-outside-toplevel
  state = {"w": torch.arange(6.0).view(2, 3), "b": torch.tensor([0.5, -1.0])}
  urls = {}
  with GcsEmulator(tmp_path / "gcs") as gcs:
    gcs.create_bucket("pth-test")
    for name, kwargs in (("zip", {}), ("legacy", {"_use_new_zipfile_serialization": False})):
      local = tmp_path / f"{name}.pth"
      torch.save({"model": state}, local, **kwargs)
      urls[name] = f"gs://pth-test/ckpt/{name}.pth"
      gcs.upload_file(local, urls[name])
    urls["evil"] = "gs://pth-test/ckpt/evil.pth"
    buf = io.BytesIO()
    torch.save({"model": state, "cfg": _Shell(tmp_path / "MARKER")}, buf)
    gcs.upload(urls["evil"], buf.getvalue())
    proc = run_python(gcs, ["-c", _GS_READER, *urls.values()], timeout=240)
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  for name in ("zip", "legacy"):
    assert got[urls[name]] == {"w": [[0, 1, 2], [3, 4, 5]], "b": [0.5, -1.0]}, name
  assert got[urls["evil"]].startswith(f"UnsafeCheckpointError: {urls['evil']}: ")
  assert not (tmp_path / "MARKER").exists()
