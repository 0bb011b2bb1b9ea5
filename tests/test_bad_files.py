"""Damaged model cards: every one refused with one line naming the file and the field, never used silently.

Generated from a good card: truncations, binary garbage, other encodings, wrong
top-level types, every known field given each wrong type and out-of-range
values, lists of the wrong length, class names that do not fit the head, and
deep nesting. Each goes through the real reader; two go through the command.
"""
import json
import os
import pathlib
import random
import re
import subprocess
import sys

import pytest

from vfocal_jax import errors, model_card, paths, workdir_config
from vfocal_jax.file_checks import BadFileError
from vfocal_jax.input_pipeline import sources, user_lists

ROOT = pathlib.Path(__file__).resolve().parents[1]

GOOD = {
    "format": model_card.FORMAT,
    "class_names": [f"class {i}" for i in range(8)],
    "provenance": {"source": "test"},
    "fields": {
        "data.eval_clip_offsets": "uniform", "data.eval_resize_ratio": 1.1428571428571428,
        "data.frame_interval": 1, "data.mean": [123.675, 116.28, 103.53], "data.sampling": "segment",
        "data.std": [58.395, 57.12, 57.375], "image_size": 64, "model.depths": [1, 1, 2, 1],
        "model.design": "parallel", "model.embed_dim": 24, "model.focal_levels": [2, 2, 2, 2],
        "model.focal_windows": [3, 3, 3, 3], "model.layerscale_value": 0.0001, "model.mlp_ratio": 4.0,
        "model.normalize_modulator": False, "model.num_classes": 8, "model.num_frames": 8, "model.patch_size": 4,
        "model.temporal_conv": "dense", "model.tubelet_size": 2, "model.use_conv_embed": False,
        "model.use_layerscale": False, "model.use_postln": False, "model.use_postln_in_modulation": False,
        "model.variant": "custom", "num_frames": 8, "test_num_clips": 1, "test_num_crops": 1,
    },
}

# Values no known field accepts, whatever its type (a string where a number is due, and so on).
WRONG_FOR = {
    int: ["8", 8.5, True, None, [8], {"v": 8}, -1, 2 ** 63],
    float: ["4.0", None, [4.0], {"v": 1}, True, -4.0, 0.0, 1e300],
    bool: ["false", 0, None, [False]],
    str: [3, None, ["parallel"], "Parallel", ""],
    list: ["1,1,2,1", 5, None, [], [1, 2], [1.5, 1, 2, 1], [-1, 1, 2, 1], [[1], 1, 2, 1]],
}
SKIP = {"model.variant", "model.layerscale_value"}  # Free-form / any number: checked separately.


def _field_cases():
  for key, good in GOOD["fields"].items():
    if key in SKIP:
      continue
    for bad in WRONG_FOR[type(good)]:
      if key in ("data.mean",) and bad in ([-1, 1, 2, 1], [1.5, 1, 2, 1], [[1], 1, 2, 1]):
        bad = [1.0]  # Lists of numbers: the wrong length is what is wrong here.
      if key == "data.mean" and bad in ([],):
        continue
      if key == "data.std" and bad in ([-1, 1, 2, 1], [1.5, 1, 2, 1]):
        bad = [58.0, -1.0, 57.0]
      yield f"{key}={json.dumps(bad)[:30]}", key, bad


def _write(tmp_path, name, data):
  d = tmp_path / name.replace("/", "_").replace(" ", "_")[:60]
  d.mkdir(parents=True, exist_ok=True)
  path = d / model_card.CARD_FILE
  path.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
  return path


def _read(path):
  return model_card.read_card(path.parent)


def _refused(path, *words):
  with pytest.raises(BadFileError) as e:
    _read(path)
  message = str(e.value)
  assert message.startswith(f"{path}: ") and "\n" not in message, message
  for w in words:
    assert w in message, message
  return message


def test_the_good_card_reads():
  card = model_card.ModelCard.from_json(GOOD, source="good")
  assert card.num_classes == 8 and card.fields["data.mean"] == (123.675, 116.28, 103.53)


@pytest.mark.parametrize("label,key,bad", list(_field_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_field_with_a_wrong_value_is_refused_naming_it(tmp_path, label, key, bad):
  card = json.loads(json.dumps(GOOD))
  card["fields"][key] = bad
  _refused(_write(tmp_path, label, card), key)


def test_values_that_disagree_are_refused(tmp_path):
  def variant(**fields):
    card = json.loads(json.dumps(GOOD))
    card["fields"].update(fields)
    return card
  _refused(_write(tmp_path, "names", dict(GOOD, class_names=["a", "b", "c"])), "class_names has 3 names",
           "num_classes=8")
  _refused(_write(tmp_path, "names_type", dict(GOOD, class_names=[1] * 8)), "class_names[0]")
  _refused(_write(tmp_path, "stages", variant(**{"model.focal_levels": [2, 2, 2]})), "differ in length")
  _refused(_write(tmp_path, "size", variant(image_size=100)), "multiple of 32")
  _refused(_write(tmp_path, "tubelet", variant(**{"model.num_frames": 7})), "not divisible")
  _refused(_write(tmp_path, "format", dict(GOOD, format="other/1")), "not a vfocal_jax.model_card/1 card")
  _refused(_write(tmp_path, "provenance", dict(GOOD, provenance=[1])), "provenance")


def test_damaged_bytes_are_refused_naming_the_file(tmp_path):
  good = json.dumps(GOOD, indent=1).encode()
  cases = {"empty": b"", "spaces": b"  \n", "nul": b"\x00" * 16, "latin1": json.dumps(GOOD).encode().replace(
      b"class 1", "clåss".encode("latin-1")), "nan": good.replace(b"4.0", b"NaN"),
           "deep": b"[" * 100_000 + b"]" * 100_000, "deep_field": good.replace(b'"test"', b"[" * 200 + b"]" * 200)}
  rng = random.Random(0)
  for i in range(6):
    cases[f"garbage{i}"] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
  for i in range(1, 12):  # Truncated anywhere.
    cases[f"cut{i}"] = good[:len(good) * i // 12]
  for kind in ([1, 2], "card", 3, None, True):
    cases[f"top_{type(kind).__name__}"] = json.dumps(kind).encode()
  for name, data in cases.items():
    _refused(_write(tmp_path, name, data))


def test_reading_json_names_the_file_for_any_reader(tmp_path):
  path = tmp_path / "dataset_info.json"
  path.write_text('{"num_examples": 3,')
  with pytest.raises(BadFileError, match=f"^{path}: not valid JSON .* line 1 column 20"):
    paths.read_json(path)


@pytest.mark.parametrize("damage,expected", [
    (b'{"format": "vfocal_jax.model_card/1", "fields": {"data.mean": [1.0]}}', "data.mean has 1 value, expected 3"),
    (b"[1, 2]", "the file is a list, expected a JSON object"),
])
def test_the_command_prints_one_line_and_exits_2(tmp_path, damage, expected):
  (tmp_path / "ckpt" / "params").mkdir(parents=True)
  card = tmp_path / "ckpt" / model_card.CARD_FILE
  card.write_bytes(damage)
  video = tmp_path / "clip.mp4"
  video.write_bytes(b"")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, str(ROOT / "main.py"), "predict", f"--checkpoint={tmp_path / 'ckpt'}",
                        f"--video={video}"], capture_output=True, text=True, env=env, timeout=300)
  errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
  assert run.returncode == 2, run.stderr[-2000:]
  assert errors == [f"error: {card}: {expected}  (--traceback shows where)"], run.stderr[-2000:]
  assert "Traceback" not in run.stderr


# --- Shard directories: dataset_info.json and labels.txt. -----------------------------------------

INFO = {"num_examples": 5, "num_classes": 3, "label_names": ["run", "jump", "swim"],
        "shards": {"train-00000-of-00002.tfrecord": 3, "train-00001-of-00002.tfrecord": 2}, "frames_per_video": 0}


def _shards(tmp_path, info=None, labels=None):
  d = tmp_path / "shards"
  d.mkdir(exist_ok=True)
  for name in INFO["shards"]:
    (d / name).write_bytes(b"")
  if info is not None:
    (d / "dataset_info.json").write_bytes(info if isinstance(info, bytes) else json.dumps(info).encode())
  if labels is not None:
    (d / "labels.txt").write_bytes(labels)
  return d


def test_good_shard_metadata_reads(tmp_path):
  s = sources.load_shard_set(str(_shards(tmp_path, INFO, b"run\njump\nswim\n")))
  assert s.counts == (3, 2) and s.num_classes == 3 and s.label_names == ("run", "jump", "swim")


@pytest.mark.parametrize("change,words", [
    ({"shards": {"train-00000-of-00002.tfrecord": -3, "train-00001-of-00002.tfrecord": 2}}, "is -3, expected"),
    ({"shards": {"train-00000-of-00002.tfrecord": "3", "train-00001-of-00002.tfrecord": 2}}, "expected an integer"),
    ({"shards": [3, 2]}, "shards is a list"),
    ({"shards": {"../x.tfrecord": 1}}, "expected a file name"),
    ({"num_examples": 7}, "add up to 5, num_examples says 7"),
    ({"num_classes": 0}, "num_classes is 0"),
    ({"label_names": ["run", "jump"]}, "label_names has 2 names, num_classes says 3"),
    ({"label_names": [1, 2, 3]}, "label_names[0]"),
    ({"frames_per_video": -1}, "frames_per_video is -1"),
    ({"frames_per_video": 1.5}, "frames_per_video is float"),
])
def test_damaged_dataset_info_is_refused_naming_the_field(tmp_path, change, words):
  d = _shards(tmp_path, dict(INFO, **change))
  with pytest.raises(BadFileError) as e:
    sources.load_shard_set(str(d))
  assert str(e.value).startswith(f"{d / 'dataset_info.json'}: ") and words in str(e.value), str(e.value)


@pytest.mark.parametrize("data,words", [
    (json.dumps(INFO).encode()[:40], "not valid JSON"), (b"", "empty file"), (b"\xff\xd8\xff\xe0", "not UTF-8"),
    (b"[1, 2]", "is a list"),
])
def test_unreadable_dataset_info_names_the_file(tmp_path, data, words):
  d = _shards(tmp_path, data)
  with pytest.raises(BadFileError, match=re.escape(words)) as e:
    sources.load_shard_set(str(d))
  assert str(e.value).startswith(f"{d / 'dataset_info.json'}: ")


@pytest.mark.parametrize("data,words", [
    (bytes(range(256)) * 4, "not UTF-8"), (b"run\x00jump\n", "NUL byte"), (b"\n \n", "no class names"),
    (b"run\njump\nrun\n", "'run' appears twice (lines 1 and 3)"), (b"x" * 5000, "5,000 characters long"),
])
def test_damaged_labels_txt_is_refused_naming_the_file(tmp_path, data, words):
  d = _shards(tmp_path, INFO, data)
  with pytest.raises(BadFileError, match=re.escape(words)) as e:
    sources.load_shard_set(str(d))
  assert str(e.value).startswith(f"{d / 'labels.txt'}: ")


# --- An export's card, read by the jax-only client. -----------------------------------------------

@pytest.mark.parametrize("card,words", [
    (b'{"export": {"format": "other"}}', "not a vfocal_jax"),
    (b"{", "not valid JSON"),
    (None, "model.num_classes is null"),
    ({"model.num_classes": 2, "num_frames": 4, "image_size": 32}, "class_names has 3 values, expected 2"),
])
def test_damaged_export_card_is_refused_naming_the_file(tmp_path, card, words):
  from vfocal_jax.export import runtime
  good = {"export": {"format": runtime.EXPORT_FORMAT, "files": {runtime.MODEL_FILE: "0" * 64},
                     "golden": {"atol": {"cpu": 1e-5, "default": 0.05}}}, "class_names": ["a", "b", "c"],
          "fields": {"model.num_classes": 3, "num_frames": 4, "image_size": 32}}
  if card is None:
    good["fields"]["model.num_classes"] = None
    card = good
  elif isinstance(card, dict):
    card = dict(good, fields=card)
  (tmp_path / runtime.MODEL_FILE).write_bytes(b"")
  path = tmp_path / runtime.CARD_FILE
  path.write_bytes(card if isinstance(card, bytes) else json.dumps(card).encode())
  with pytest.raises(BadFileError, match=re.escape(words)) as e:
    runtime.read_export_card(tmp_path)
  assert str(e.value).startswith(f"{path}: ")


# --- A config file of the user's: one line naming the file (and line), never a traceback. -----------------

@pytest.mark.parametrize("source,expected", [
    (b"def get_config(:\n  pass\n", ":1: invalid syntax (the config file does not parse)"),
    (b"\xff\xfe\x00garbage", ": source code string cannot contain null bytes (the config file does not parse)"),
    (b"x = 1\n", ": no get_config() function"),
    (b"def get_config():\n  return undefined_name\n", ":2: NameError: name undefined_name is not defined"),
    (b"def get_config():\n  raise ValueError('bad value here')\n", ":2: ValueError: bad value here"),
])
def test_a_damaged_config_file_is_one_line(tmp_path, source, expected):
  config = tmp_path / "my_config.py"
  config.write_bytes(source)
  run = subprocess.run([sys.executable, str(ROOT / "main.py"), "train", f"--config={config}",
                        f"--workdir={tmp_path / 'w'}"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert run.returncode == 2, run.stderr[-2000:]
  lines = [line for line in run.stderr.splitlines() if line.strip()]
  assert lines[-1].startswith(f"error: {config}{expected}"), run.stderr[-2000:]
  assert "Traceback" not in run.stderr and not (tmp_path / "w").exists()


# --- Lists handed to predict / visualize: --video=LIST.csv and --labels=FILE. ------------------------------

@pytest.mark.parametrize("data,words", [
    (b"", "no video paths"), (b"path,label\n", "no video paths"), (b"\n# a comment\n", "no video paths"),
    (bytes(range(256)), "not UTF-8 text (byte 0x80 at offset 128)"), (b"a.mp4\n\x00", "NUL byte at offset 6"),
    (b"label,youtube_id,time_start\nrun,x,3\n", "line 1 looks like a header (label, youtube_id, time_start) without"),
    (b"path,label\na.mp4,0\n,1\n", "line 3 has no video path in column 1"),
    (b"a.mp4\n\x01\x02\n", "line 2: the video path holds the control character '\\x01'"),
    (b"a" * 5000 + b"\n", "line 1: the video path is 5,000 characters long"),
    (b'a.mp4\n"' + b"b" * 200_000 + b'"\n', "line 2 is not CSV (field larger than field limit"),
])
def test_a_damaged_video_list_is_refused_naming_the_file_and_line(tmp_path, data, words):
  path = tmp_path / "videos.csv"
  path.write_bytes(data)
  with pytest.raises(BadFileError) as e:
    user_lists.read_video_list(str(path))
  assert str(e.value).startswith(f"{path}: ") and words in str(e.value), str(e.value)


def test_a_video_list_reads_paths_relative_to_itself_and_warns_of_repeats(tmp_path, caplog):
  path = tmp_path / "videos.csv"
  path.write_bytes(b"\xef\xbb\xbflabel,path\n0,clips/a.mp4\n1,./clips/a.mp4\n2,/data/b.mp4\n3,gs://b/c.mp4\n")
  assert user_lists.read_video_list(str(path)) == [str(tmp_path / "clips" / "a.mp4"), "/data/b.mp4", "gs://b/c.mp4"]
  assert "line 3 repeats line 2" in caplog.text and "predicted once" in caplog.text
  path.write_bytes(b"my video.mp4\nclip 7.mp4 3\nb.mp4 running\n")  # "path label" rows, and spaces in names.
  assert user_lists.read_video_list(str(path)) == [str(tmp_path / n) for n in ("my video.mp4", "clip 7.mp4", "b.mp4")]
  with pytest.raises(errors.MissingFileError, match=f"^{tmp_path / 'nope.csv'}: no such file$"):
    user_lists.read_video_list(str(tmp_path / "nope.csv"))


@pytest.mark.parametrize("data,words", [
    (b"", "no class names"), (b"id,name\n", "no class names after the id,name header"),
    (b"id,name\n0,run\nx,jump\n", "line 3: the id 'x' is not an integer"),
    (b"id,name\n0,run\n1000000000000,jump\n", "line 3: the id 1000000000000 is not in [0, 1048576)"),
    (b"id,name\n0,run\n0,jump\n", "id 0 appears twice (lines 2 and 3)"), (b"id,name\n0,\n", "line 2: empty class name"),
    (b"\xff\xfer\x00u\x00n\x00", "not UTF-8 text"),
])
def test_a_damaged_labels_file_is_refused_naming_the_file(tmp_path, data, words):
  path = tmp_path / "labels.csv"
  path.write_bytes(data)
  with pytest.raises(BadFileError) as e:
    user_lists.read_class_names(str(path))
  assert str(e.value).startswith(f"{path}: ") and words in str(e.value), str(e.value)


def test_a_labels_table_with_gaps_warns_and_keeps_the_indices(tmp_path, caplog):
  path = tmp_path / "labels.csv"
  path.write_bytes(b'id,name\n0,run\n2,"jump, high"\n')
  assert user_lists.read_class_names(str(path)) == ["run", None, "jump, high"]
  assert "no name for class id(s) 1" in caplog.text


# --- Files read back from a workdir and its checkpoints, and the demo data's marker. ------------------------

def _run_config():
  from vfocal_jax.configs import default
  return json.loads(default.get_config().to_json_best_effort())


@pytest.mark.parametrize("change,words", [
    (lambda c: c["data"].update(eval_shards=3), "data.eval_shards is int, expected a string"),
    (lambda c: c["data"].update(mean=[1.0, 2.0]), "data.mean has 2 values, expected 3"),
    (lambda c: c["data"].update(rrc_area_range=[[0.1], 1.0]), "data.rrc_area_range[0] is a list"),
    (lambda c: c["model"].update(embed_dim="96"), "model.embed_dim is a string '96', expected an integer"),
    (lambda c: c["model"].update(depths=[2, -2, 6, 2]), "model.depths[1] is -2"),
    (lambda c: c.update(image_size=100), "image_size is 100, expected a multiple of 32"),
    (lambda c: c.pop("data"), "has no data object"),
    (lambda c: c["data"].update({"a.b": 1}), "has the field 'data.a.b', which is not a config field name"),
])
def test_a_damaged_workdir_config_is_refused_naming_the_field(tmp_path, change, words):
  config = _run_config()
  change(config)
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(BadFileError) as e:
    workdir_config.read_config(tmp_path)
  assert str(e.value).startswith(f"{tmp_path / 'config.json'}: ") and words in str(e.value), str(e.value)


def test_an_older_workdir_config_takes_the_defaults_it_lacks_with_a_warning(tmp_path, caplog):
  config = _run_config()
  del config["data"]["eval_clip_offsets"]
  (tmp_path / "config.json").write_text(json.dumps(config))
  assert workdir_config.read_config(tmp_path).data.eval_clip_offsets == "uniform"
  assert "data has no eval_clip_offsets" in caplog.text and "assumed the defaults: eval_clip_offsets='uniform'" \
      in caplog.text


@pytest.mark.parametrize("data,words", [
    (b'{"examples_consumed": 64, "global_b', "not valid JSON"),
    (b'{"examples_consumed": -64}', "examples_consumed is -64, expected a value from 0"),
    (b'{"examples_consumed": "64"}', "examples_consumed is a string '64', expected an integer"),
    (b'{"process_count": 0}', "process_count is 0"), (b'{"state_saved": "yes"}', "state_saved is a string"),
    (b"[64]", "the file is a list"),
])
def test_a_damaged_input_position_is_refused(tmp_path, data, words):
  from etils import epath
  from vfocal_jax import checkpoints
  path = tmp_path / checkpoints.POSITION_FILE
  path.write_bytes(data)

  class Item:
    def restore_position(self, position, exact):
      raise AssertionError("a damaged position was used")
  with pytest.raises(BadFileError) as e:
    checkpoints.restore_data(epath.Path(tmp_path), Item(), 0, 1)
  assert str(e.value).startswith(f"{path}: ") and words in str(e.value), str(e.value)


def test_a_damaged_loop_state_is_not_used_and_a_warning_says_so(tmp_path, caplog):
  from vfocal_jax import checkpoints
  loop = tmp_path / "7" / "loop"
  loop.mkdir(parents=True)
  manager = type("Manager", (), {"directory": tmp_path})()
  for data, words in [(b'{"window": {"num_steps": 3, "sums": {"loss": 1}}}', "window.sums has no"),
                      (b'{"window": {"num_steps": -1, "sums": null}}', "window.num_steps is -1"), (b"{", "not valid")]:
    (loop / checkpoints.LOOP_FILE).write_bytes(data)
    caplog.clear()
    assert checkpoints.read_loop_state(manager, 7) is None
    assert f"{loop / checkpoints.LOOP_FILE}: " in caplog.text and words in caplog.text, caplog.text
    assert "the first metrics reported after the resume average only the steps after step 7" in caplog.text
  (loop / checkpoints.LOOP_FILE).write_bytes(b'{"window": {"num_steps": 0, "sums": null}}')
  assert checkpoints.read_loop_state(manager, 7) == {"window": {"num_steps": 0, "sums": None}}


@pytest.mark.parametrize("data,words", [
    (b'{"oversample": 4', "not valid JSON"), (b"\x89PNG\r\n", "not UTF-8"),
    (b'{"frames": 3}', "unknown field 'frames'"),
    (b'{"oversample": 1}', "oversample is 1, expected a value from 2"), (b"[4]", "the file is a list"),
])
def test_a_damaged_demo_marker_is_refused_and_says_how_to_rebuild(tmp_path, data, words):
  from vfocal_jax.data import demo_dataset
  done = tmp_path / "DONE"
  done.write_bytes(data)
  with pytest.raises(BadFileError) as e:
    demo_dataset.read_done_marker(str(done))
  assert str(e.value).startswith(f"{done}: ") and words in str(e.value), str(e.value)
  assert str(e.value).endswith(f"; delete {tmp_path} to build the demo data again")
  done.write_bytes(b"")
  assert demo_dataset.read_done_marker(str(done)) == {}


def test_make_shards_csv_that_is_not_text_names_the_file(tmp_path):
  from vfocal_jax.data import make_shards
  path = tmp_path / "train.csv"
  path.write_bytes("a.mp4,caf\xe9\n".encode("latin-1"))
  with pytest.raises(BadFileError, match=re.escape(f"{path}: not UTF-8 text (byte 0xe9 at offset 9)")):
    make_shards.read_csv(str(path))
  with pytest.raises(errors.MissingFileError, match=re.escape(f"{tmp_path / 'no.csv'}: no such file")):
    make_shards.read_csv(str(tmp_path / "no.csv"))


@pytest.mark.parametrize("labels,words", [
    (b"run\njump\n", "its 2 class names differ from the 3 label_names of"),
    (b"run\nswim\njump\n", "its 3 class names differ from the 3 label_names of"),
])
def test_labels_txt_that_disagrees_with_dataset_info_beside_it_is_refused(tmp_path, labels, words):
  d = _shards(tmp_path, INFO, labels)
  with pytest.raises(BadFileError, match=re.escape(words)) as e:
    sources.load_shard_set(str(d))
  assert str(e.value).startswith(f"{d / 'labels.txt'}: ")
  d = _shards(tmp_path, dict(INFO, label_names=None), labels)
  if len(labels.split()) != 3:
    with pytest.raises(BadFileError, match=re.escape("2 class names, but")):
      sources.load_shard_set(str(d))
