"""export: the artifact runs without Flax (jax alone, TensorFlow alone) and gives the Flax model's outputs.

A tiny random Video-FocalNet is saved as a converted checkpoint and exported
once for cpu, cuda and tpu (the module fixture). Two fresh child processes
read the export: one with jax and `vfocal_jax.export` only (no Flax, no model
code, no TensorFlow), one with TensorFlow only (no jax). Their outputs on
random uint8 clips are compared with the Flax model of the checkpoint fed
clips normalised here in float64 NumPy with the ImageNet mean/std written out.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import NUM_CLASSES, ROOT, save_random_checkpoint, tiny_model_config
from reference_views import MEAN, STD, write_video
from vfocal_jax import artifacts, errors, model_card, params_io, predict, resolve
from vfocal_jax.export import runtime, writer

FRAMES, SIZE = 4, 32  # The tiny model's clip (helpers.tiny_model_config).

JAX_CHILD = """
import json, sys
for name in ("flax", "tensorflow", "vfocal_jax.models", "vfocal_jax.artifacts"):
  sys.modules[name] = None  # Importing any of them now fails.
import numpy as np
from vfocal_jax import export
model = export.load(sys.argv[1])
clips = np.load(sys.argv[2])
np.savez(sys.argv[3], batch1=np.asarray(model(clips[:1])), batch3=np.asarray(model(clips)),
         views=np.asarray(model.views(clips[None])), golden_diff=model.check_golden(atol=float("inf")))
print(json.dumps(sorted(m for m, v in sys.modules.items() if v is not None and (
    m.split(".")[0] in ("flax", "tensorflow") or m.startswith(("vfocal_jax.models", "vfocal_jax.artifacts"))))))
"""

TF_CHILD = """
import json, sys
sys.modules["jax"] = sys.modules["flax"] = None  # TensorFlow imports jax when it can (tf.lite): not here.
import numpy as np
import tensorflow as tf
served = tf.saved_model.load(sys.argv[1] + "/saved_model")
clips = tf.constant(np.load(sys.argv[2]))
one = served.signatures["serving_default"](video=clips[:1])
three = served.signatures["serving_default"](video=clips)
views = served.signatures["views"](video=clips[None])
np.savez(sys.argv[3], logits1=one["logits"].numpy(), logits3=three["logits"].numpy(),
         probabilities3=three["probabilities"].numpy(), views=views["probabilities"].numpy())
print(json.dumps(sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in ("jax", "flax"))))
"""


def _config():
  return tiny_model_config(clips=2, crops=1)


def _child(code, *args):
  return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _finish(process, outputs):
  """The child's outputs and the modules it imported that it must not, or its error (asserted by the tests)."""
  out, err = process.communicate(timeout=600)
  if process.returncode:
    return {"error": err[-3000:]}
  return {"modules": json.loads(out.strip().splitlines()[-1]), "outputs": np.load(outputs)}


def _child_result(exported, name):
  result = exported[name]
  assert "error" not in result, result.get("error")
  return result["modules"], result["outputs"]


def _softmax(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp("export")
  # A head scaled by 20: logits of a few units, not ~1e-3.
  model, params, checkpoint = save_random_checkpoint(root / "converted", _config(), head_scale=20.0,
                                                     class_names=list("abcde"))
  out = str(root / "out")
  entry = writer.run(resolve.artifact(resolve.UserConfig(), checkpoint=checkpoint), output_dir=out)

  clips = np.random.default_rng(7).integers(0, 256, (3, FRAMES, SIZE, SIZE, 3)).astype(np.uint8)
  np.save(root / "clips.npy", clips)
  jax_child = _child(JAX_CHILD, out, root / "clips.npy", root / "jax_out.npz")
  tf_child = _child(TF_CHILD, out, root / "clips.npy", root / "tf_out.npz")

  # The reference: the Flax model on clips normalised in float64 NumPy, the golden clips after the random ones.
  golden = np.load(os.path.join(out, runtime.GOLDEN_FILE))
  video = np.concatenate([clips, golden["video"]])
  forward = jax.jit(lambda x: model.apply({"params": params}, x, train=False))
  reference = np.asarray(forward(((video - MEAN) / STD).astype(np.float32)), np.float64)
  return dict(root=root, out=out, entry=entry, checkpoint=checkpoint, clips=clips, golden=golden,
              reference=reference[:3], golden_reference=reference[3:],
              jax=_finish(jax_child, root / "jax_out.npz"), tf=_finish(tf_child, root / "tf_out.npz"))


def test_exported_model_runs_with_jax_alone_and_matches_flax(exported):
  modules, got = _child_result(exported, "jax")
  assert modules == []  # No Flax, no TensorFlow, no model code in the child.
  reference = exported["reference"]
  assert got["batch1"].dtype == np.float32 and got["batch3"].shape == (3, NUM_CLASSES)
  assert np.abs(reference).max() > 1.0
  np.testing.assert_allclose(got["batch1"], reference[:1], rtol=0, atol=1e-5)
  np.testing.assert_allclose(got["batch3"], reference, rtol=0, atol=1e-5)
  np.testing.assert_allclose(got["views"], _softmax(reference).mean(0, keepdims=True), rtol=0, atol=1e-5)


def test_saved_model_runs_with_tensorflow_alone_and_matches_flax(exported):
  modules, got = _child_result(exported, "tf")
  assert modules == []  # No jax, no Flax in the child.
  reference = exported["reference"]
  np.testing.assert_allclose(got["logits1"], reference[:1], rtol=0, atol=1e-4)
  np.testing.assert_allclose(got["logits3"], reference, rtol=0, atol=1e-4)
  np.testing.assert_allclose(got["probabilities3"], _softmax(reference), rtol=0, atol=1e-4)
  np.testing.assert_allclose(got["views"], _softmax(reference).mean(0, keepdims=True), rtol=0, atol=1e-4)


def test_golden_clips_hold_the_flax_logits_and_reproduce(exported):
  np.testing.assert_allclose(exported["golden"]["logits"], exported["golden_reference"], rtol=0, atol=1e-5)
  assert exported["golden"]["video"].dtype == np.uint8
  assert 0 <= float(_child_result(exported, "jax")[1]["golden_diff"]) <= 1e-5


def test_card_records_platforms_versions_and_the_sha256_of_every_file(exported):
  card = json.loads(open(os.path.join(exported["out"], runtime.CARD_FILE)).read())
  entry = card["export"]
  assert entry == exported["entry"]
  assert entry["platforms"] == ["cpu", "cuda", "tpu"] and entry["jax_version"] == jax.__version__
  assert entry["input"]["shape"] == [None, FRAMES, SIZE, SIZE, 3] and entry["output"]["shape"] == [None, NUM_CLASSES]
  assert card["fields"]["model.embed_dim"] == 8 and card["class_names"] == list("abcde")
  found = {}
  for directory, _, files in os.walk(exported["out"]):
    for name in files:
      path = os.path.join(directory, name)
      relative = os.path.relpath(path, exported["out"])
      if relative != runtime.CARD_FILE:
        found[relative] = hashlib.sha256(open(path, "rb").read()).hexdigest()
  assert entry["files"] == found and "model.jax" in found and "saved_model/saved_model.pb" in found
  assert 0 < entry["calling_convention_version"] <= jax.export.maximum_supported_calling_convention_version


def test_a_damaged_model_file_is_refused(exported, tmp_path):
  damaged = tmp_path / "damaged"
  shutil.copytree(exported["out"], damaged, ignore=shutil.ignore_patterns("saved_model"))
  data = bytearray((damaged / "model.jax").read_bytes())
  data[len(data) // 2] ^= 0xFF
  (damaged / "model.jax").write_bytes(bytes(data))
  with pytest.raises(ValueError, match="differs from the card"):
    runtime.load(damaged)
  with pytest.raises(FileNotFoundError, match="not an exported model"):
    runtime.load(exported["checkpoint"])
  (damaged / "model.jax").write_bytes(b"\x00" * 64 + data[:100])  # Not a flatbuffer: deserialization fails.
  with pytest.raises(errors.BadFileError, match="model.jax: cannot be deserialized"):
    runtime.load(damaged, verify=False)


def test_a_damaged_card_or_golden_file_is_one_line_naming_it(exported, tmp_path):
  damaged = tmp_path / "damaged"
  shutil.copytree(exported["out"], damaged, ignore=shutil.ignore_patterns("saved_model"))
  card = json.loads((damaged / "model_card.json").read_text())
  for where, value, message in ((("files",), ["model.jax"], "export.files is a list"),
                                (("golden", "atol", "default"), "1e-5", "export.golden.atol.default is a string")):
    bad = json.loads(json.dumps(card))
    target = bad["export"]
    for key in where[:-1]:
      target = target[key]
    target[where[-1]] = value
    (damaged / "model_card.json").write_text(json.dumps(bad))
    with pytest.raises(errors.BadFileError, match=message):
      runtime.load(damaged)
  (damaged / "model_card.json").write_text(json.dumps(card))
  (damaged / "golden.npz").write_bytes(b"PK\x03\x04 not a zip")
  with pytest.raises(errors.BadFileError, match="golden.npz: not the golden clips"):
    runtime.load(damaged).check_golden()


def test_wrong_clips_are_one_line_errors_naming_the_expected_shape(exported):
  model = runtime.load(exported["out"])
  clip = exported["clips"][:1]
  for bad in (clip[:, :3], clip.astype(np.float32), clip[:, :, :16, :16], clip[0]):
    with pytest.raises(ValueError, match=r"expected uint8 RGB clips of shape \(B, 4, 32, 32, 3\)") as info:
      model(bad)
    assert "\n" not in str(info.value)
  with pytest.raises(ValueError, match=r"\(B, V, 4, 32, 32, 3\)"):
    model.views(clip)
  assert model.check_golden() <= 1e-5  # The card's cpu tolerance.


def test_predict_through_the_export_matches_predict_with_flax(exported, tmp_path):
  frames = np.random.default_rng(3).integers(0, 256, (9, SIZE, 40, 3)).astype(np.uint8)
  video = str(tmp_path / "clip.mkv")
  write_video(video, frames)
  (flax_result,) = predict.run(resolve.artifact(resolve.UserConfig(), checkpoint=exported["checkpoint"]), videos=video)
  (exported_result,) = predict.run(resolve.exported(resolve.UserConfig(), exported["out"]), videos=video)
  assert exported_result["num_views"] == flax_result["num_views"] == 2
  np.testing.assert_allclose(exported_result["probs"], flax_result["probs"], rtol=0, atol=1e-5)
  assert exported_result["top"][0][1] == flax_result["top"][0][1]


def test_existing_output_is_kept_and_a_misfit_checkpoint_writes_nothing(exported, tmp_path):
  card_path = os.path.join(exported["out"], runtime.CARD_FILE)
  before = open(card_path).read()
  run = subprocess.run([sys.executable, "main.py", "export", f"--checkpoint={exported['checkpoint']}",
                        f"--output_dir={exported['out']}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == 2 and "already exists" in run.stderr and "--overwrite" in run.stderr
  assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr
  assert open(card_path).read() == before

  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="only replaces an export"):
    writer.run(resolve.artifact(resolve.UserConfig(), checkpoint=exported["checkpoint"]), output_dir=str(other),
               overwrite=True)
  assert (other / "notes.txt").read_text() == "keep me"

  config = _config()  # The card says embed_dim 8; these parameters are of width 16.
  model16 = artifacts.build_model(_config().copy_and_resolve_references()).clone(embed_dim=16)
  params16 = jax.eval_shape(lambda: artifacts.init_params(model16, jax.random.key(0), FRAMES, SIZE))
  params16 = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), params16)
  misfit = params_io.save_params(tmp_path / "misfit", params16,
                                 model_card.card_from_config(config, artifacts.build_model(config)))
  with pytest.raises(artifacts.ParamsMismatchError, match="do not fit"):
    writer.run(resolve.artifact(resolve.UserConfig(), checkpoint=misfit), output_dir=str(tmp_path / "never"))
  assert not (tmp_path / "never").exists()
