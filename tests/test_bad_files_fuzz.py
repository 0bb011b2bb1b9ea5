"""Damaged versions of every file a user hands us (besides .pth): one line naming the file, never a traceback.

For each kind of file a command reads back (model cards, ``dataset_info.json``,
``labels.txt``, ``--video`` lists, ``--labels`` files, a workdir's
``config.json``, a legacy ``model.json``, a checkpoint's ``position.json`` and
loop state, the demo data's ``DONE`` marker, export cards) this file generates
damaged copies of a good one: empty, blank, NUL bytes, binary garbage, UTF-16
and Latin-1, truncated at many points, random byte flips, deep nesting, huge and
negative numbers, NaN, wrong top-level types, every field given values of
other types, lists of other lengths. All of them go through the readers the
commands use in ONE child process (memory bounded with RLIMIT_AS, a per-case
alarm, the whole child under a timeout), which reports each outcome:

  refused  a ``UserError`` whose message is one line and starts with the file's path;
  warned   (loop state only) a warning naming the file, and nothing used;
  ok       accepted (only where the damage can leave a valid file: a truncated list,
           a changed free-form field, a flipped byte in a string);
  bug      any other exception: always a failure.

Structural damage (empty, binary, non-UTF-8, truncated JSON, wrong top-level
type, wrong type in a checked field) must be refused. A few damaged files then go through
``main.py`` itself: exit status 2, one ``error:`` line naming the file, no
traceback.
"""
import json
import os
import pathlib
import random
import subprocess
import sys
import textwrap

import pytest

from test_bad_files import GOOD as GOOD_CARD
from test_bad_files import INFO as GOOD_INFO

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")

SUMS = {"_reduction_counter": {"value": 1}, **{k: {"total": 1.5, "count": 3} for k in
                                                 ("loss", "top1", "grad_norm", "learning_rate", "non_finite")}}
GOOD_JSON = {
    "card": GOOD_CARD,
    "dataset_info": GOOD_INFO,
    "position": {"examples_consumed": 64, "global_batch": 8, "epoch_size": 100, "state_saved": True,
                 "skipped_at_start": 0, "process_count": 1, "device_count": 1},
    "loop": {"window": {"num_steps": 3, "sums": SUMS}},
    "done": {"oversample": 2, "frames_per_video": 16},
    "legacy_model": {"variant": "custom", "embed_dim": 8, "depths": [1, 1, 1, 1], "num_classes": 5, "num_frames": 4},
    "export_card": {"export": {"format": "vfocal_jax.export/1", "files": {"model.jax": "0" * 64},
                               "golden": {"atol": {"cpu": 1e-5, "default": 0.05}}}, "class_names": ["a", "b", "c"],
                    "fields": {"model.num_classes": 3, "num_frames": 4, "image_size": 32}},
}
GOOD_TEXT = {
    "video_list": b"path,label\nclips/a.mp4,0\nclips/b.mp4,1\n/data/c.mp4,2\ngs://bucket/d.webm,3\n",
    "class_names": b"id,name\n0,abseiling\n1,air drumming\n2,\"answering questions, on phone\"\n",
    "labels_txt": b"run\njump\nswim\n",
}
# Leaves that are free-form (any value is the user's) or not read by any command: changing them may pass.
UNCHECKED = {"card": ("provenance", "fields.model.variant"), "legacy_model": ("variant",)}
# config.json: only data.*, model.* and the clip fields are read back (by eval and by legacy cards).
CONFIG_CHECKED = ("data.", "model.", "num_frames", "image_size", "test_num_clips", "test_num_crops")


def _good_config():
  from vfocal_jax.configs import default  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.num_frames, config.image_size, config.test_num_clips, config.test_num_crops = 4, 32, 1, 1
  return json.loads(config.to_json_best_effort())


def _leaves(value, keys=()):
  """(keys, leaf) of a JSON value; lists of scalars are leaves."""
  if isinstance(value, dict):
    for k, v in value.items():
      yield from _leaves(v, keys + (k,))
  elif isinstance(value, list) and value and not all(isinstance(v, (int, float, str)) for v in value):
    for i, v in enumerate(value):
      yield from _leaves(v, keys + (i,))
  else:
    yield keys, value


def _name(keys):
  return ".".join(str(k) for k in keys)


def _set(value, keys, new):
  out = json.loads(json.dumps(value))
  node = out
  for k in keys[:-1]:
    node = node[k]
  node[keys[-1]] = new
  return out


def _other_type_values(good):
  """Values of other JSON types than ``good``'s (null only where good is not null)."""
  if isinstance(good, bool):
    return ["true", 1, [good]]
  if isinstance(good, (int, float)):
    return [str(good), [good], {"v": good}] + ([True] if good not in (0, 1) else [])
  if isinstance(good, str):
    return [7, [good], {"v": good}]
  if isinstance(good, list):
    return [",".join(map(str, good)), 3, {"v": good}]
  return [7, "x", [1]]


def _json_cases(kind, good, rng):
  """(label, bytes, must_refuse) for a JSON file."""
  text = json.dumps(good, indent=1).encode()
  yield "empty", b"", kind != "done"  # An empty DONE: the data was built with the default layout.
  yield "blank", b" \n\t\n", kind != "done"
  yield "nul", b"\x00" * 32, True
  yield "utf16", json.dumps(good).encode("utf-16"), True
  yield "latin1", text.replace(b"{", "{\"\xe9\": 1, ".encode("latin-1"), 1), True
  number = next(k for k, v in _leaves(good) if isinstance(v, (int, float)) and not isinstance(v, bool))
  yield "nan", json.dumps(_set(good, number, float("nan"))).encode(), True
  yield "infinity", json.dumps(_set(good, number, float("inf"))).encode(), True
  yield "deep_array", b"[" * 50_000 + b"]" * 50_000, True
  yield "deep_object", b'{"a":' * 5_000 + b"1" + b"}" * 5_000, True
  yield "huge_number", b"1" + b"0" * 100_000, True
  for top in ([1, 2], "text", 3, None, True, []):
    yield f"top_{type(top).__name__}", json.dumps(top).encode(), True
  for i in range(6):
    yield f"garbage{i}", bytes(rng.randrange(256) for _ in range(rng.randrange(16, 300))), True
  for i in range(1, 16):
    yield f"cut{i}", text[:len(text) * i // 16], True
  for i in range(12):  # One byte anywhere set to anything: often still valid JSON.
    pos = rng.randrange(len(text))
    yield f"flip{i}", text[:pos] + bytes([rng.randrange(256)]) + text[pos + 1:], False
  unchecked = UNCHECKED.get(kind, ())
  for keys, value in _leaves(good):
    path = _name(keys)
    if kind == "config_json":
      checked = path.startswith(CONFIG_CHECKED)
    else:
      checked = not any(path == u or path.startswith(u + ".") for u in unchecked)
    if kind == "config_json" and value is None:
      continue  # A field the variant fills in: null is its value, any other is checked below.
    for bad in _other_type_values(value):
      yield f"{path}={json.dumps(bad)[:20]}", json.dumps(_set(good, keys, bad)).encode(), checked
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      for bad in (-1, -10 ** 30, 10 ** 30, 1e308, 0.5):
        yield f"{path}={bad}", json.dumps(_set(good, keys, bad)).encode(), False
    if isinstance(value, list) and value:
      yield f"{path}=short", json.dumps(_set(good, keys, value[:-1])).encode(), False
      yield f"{path}=long", json.dumps(_set(good, keys, value + value[-1:] * 3)).encode(), False
      yield f"{path}=deep", json.dumps(_set(good, keys, [[[[value]]]])).encode(), checked


def _text_cases(kind, good, rng):
  """(label, bytes, must_refuse) for a text / CSV file."""
  yield "empty", b"", True
  yield "blank", b"\n \n\r\n", True
  yield "comments_only", b"# nothing here\n", kind != "labels_txt"
  yield "nul", good.replace(b"\n", b"\x00\n", 1), True
  yield "utf16", good.decode().encode("utf-16"), True
  yield "latin1", good + "caf\xe9\n".encode("latin-1"), True
  yield "bom", b"\xef\xbb\xbf" + good, False
  yield "crlf", good.replace(b"\n", b"\r\n"), False
  yield "control", good + b"a\x01b\n", True
  yield "long_line", good + b"x" * 5000 + b"\n", True
  yield "huge_field", good + b'"' + b"y" * 200_000 + b'"\n', True
  yield "unclosed_quote", good + b'"z.mp4,1\n' * 3, False
  for i in range(6):
    yield f"garbage{i}", bytes(rng.randrange(256) for _ in range(rng.randrange(64, 300))), True
  for i in range(1, 10):
    yield f"cut{i}", good[:len(good) * i // 10], False  # A shorter list is still a list.
  for i in range(10):
    pos = rng.randrange(len(good))
    yield f"flip{i}", good[:pos] + bytes([rng.randrange(256)]) + good[pos + 1:], False
  if kind == "video_list":
    yield "header_only", b"path,label\n", True
    yield "no_path_column", b"label,youtube_id,time_start\nrun,abc,3\n", True
    yield "empty_path_cell", good + b",4\n", True
    yield "duplicates", good + good.split(b"\n", 1)[1], False
    yield "huge_file", b"a.mp4\n" * ((64 << 20) // 6 + 1), True
  if kind == "class_names":
    yield "header_only", b"id,name\n", True
    yield "id_not_int", good + b"x,walking\n", True
    yield "id_negative", good + b"-1,walking\n", True
    yield "id_huge", good + b"100000000000000000000,walking\n", True
    yield "id_twice", good + b"0,walking\n", True
    yield "name_empty", good + b"3,\n", True
    yield "names_twice", good + b"3,abseiling\n", False
    yield "id_gap", good + b"9,walking\n", False
  if kind == "labels_txt":
    yield "duplicates", good + b"run\n", True


def _write_case(directory, kind, data):
  """Writes one damaged file where its reader looks for it; returns the file's path."""
  directory.mkdir(parents=True)
  name = {"card": "model_card.json", "dataset_info": "dataset_info.json", "labels_txt": "labels.txt",
          "video_list": "videos.csv", "class_names": "labels.csv", "config_json": "config.json",
          "legacy_model": "model.json", "position": "position.json", "loop": "metadata", "done": "DONE",
          "export_card": "model_card.json"}[kind]
  if kind in ("dataset_info", "labels_txt"):
    for shard in GOOD_INFO["shards"]:
      (directory / shard).write_bytes(b"")
    if kind == "labels_txt":
      (directory / "dataset_info.json").write_text(json.dumps(GOOD_INFO))
  if kind in ("card", "legacy_model"):
    (directory / "params").mkdir()
  if kind == "config_json":
    (directory / "checkpoints").mkdir()
  if kind == "loop":
    directory = directory / "1" / "loop"
    directory.mkdir(parents=True)
  if kind == "export_card":
    (directory / "model.jax").write_bytes(b"")
  (directory / name).write_bytes(data)
  return directory / name


_WORKER = textwrap.dedent(r'''
    import json, os, resource, signal, sys, time, traceback, logging as pylog
    sys.path.insert(0, sys.argv[3])
    from absl import logging
    from etils import epath
    from vfocal_jax import checkpoints, errors, model_card, workdir_config
    from vfocal_jax.data import demo_dataset
    from vfocal_jax.export import runtime
    from vfocal_jax.input_pipeline import sources, user_lists

    warnings = []
    class Capture(pylog.Handler):
      def emit(self, record):
        warnings.append(record.getMessage())
    logging.get_absl_logger().addHandler(Capture(level=pylog.WARNING))

    class Iterator:  # restore_data's item: records what it was told.
      def save(self, path): pass
      def restore(self, path): pass
      def restore_position(self, position, exact):
        return True, f"moved to {position.get('examples_consumed')}"

    class Manager:
      def __init__(self, directory): self.directory = directory

    def read(kind, path):
      d = os.path.dirname(path)
      if kind == "card": return model_card.read_card(d)
      if kind in ("dataset_info", "labels_txt"): return sources.load_shard_set(d)
      if kind == "video_list": return user_lists.read_video_list(path)
      if kind == "class_names": return user_lists.read_class_names(path)
      if kind == "config_json": return workdir_config.read_config(d).to_dict()
      if kind == "legacy_model": return workdir_config.read_legacy_model_fields(d)
      if kind == "position": return checkpoints.restore_data(epath.Path(d), Iterator(), 0, 1)
      if kind == "loop": return checkpoints.read_loop_state(Manager(os.path.dirname(os.path.dirname(d))), 1)
      if kind == "done": return demo_dataset.read_done_marker(path)
      if kind == "export_card": return runtime.read_export_card(d)
      raise AssertionError(kind)

    def alarm(signum, frame):
      raise TimeoutError("case took over 20 s")
    signal.signal(signal.SIGALRM, alarm)
    vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), vm + (2 << 30)))
    cases = json.load(open(sys.argv[1]))
    with open(sys.argv[2], "w") as out:
      for case in cases:
        del warnings[:]
        start = time.time()
        signal.alarm(20)
        try:
          value = read(case["kind"], case["path"])
          mine = [w for w in warnings if case["path"] in w]
          result = {"outcome": "warned", "message": mine[0]} if mine and value is None else \
              {"outcome": "ok", "message": repr(value)[:200], "warnings": warnings[:3]}
        except errors.UserError as e:
          result = {"outcome": "refused", "type": type(e).__name__, "message": str(e)}
        except BaseException as e:  # A bug, a MemoryError, a timeout.
          result = {"outcome": "bug", "type": type(e).__name__, "message": str(e)[:300],
                    "traceback": traceback.format_exc()[-1500:]}
        finally:
          signal.alarm(0)
        result.update(case, seconds=round(time.time() - start, 3))
        out.write(json.dumps(result) + "\n")
        out.flush()
''')


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
  root = tmp_path_factory.mktemp("damaged")
  rng = random.Random(23)
  goods = dict(GOOD_JSON, config_json=_good_config())
  cases = []
  for kind, good in goods.items():
    for label, data, must_refuse in _json_cases(kind, good, rng):
      cases.append((kind, label, data, must_refuse))
  for kind, good in GOOD_TEXT.items():
    for label, data, must_refuse in _text_cases(kind, good, rng):
      cases.append((kind, label, data, must_refuse))
  for kind in list(goods) + list(GOOD_TEXT):  # The good file of each kind must read.
    good = goods.get(kind)
    cases.append((kind, "good", json.dumps(good).encode() if good is not None else GOOD_TEXT[kind], False))
  manifest = []
  for i, (kind, label, data, must_refuse) in enumerate(cases):
    path = _write_case(root / f"{i:04d}_{kind}", kind, data)
    manifest.append({"kind": kind, "label": label, "path": str(path), "must_refuse": must_refuse})
  (root / "manifest.json").write_text(json.dumps(manifest))
  out = root / "outcomes.jsonl"
  proc = subprocess.run([sys.executable, "-c", _WORKER, str(root / "manifest.json"), str(out), str(ROOT)],
                        env=ENV, capture_output=True, text=True, timeout=240)
  results = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
  assert proc.returncode == 0 and len(results) == len(manifest), (
      f"the child died (status {proc.returncode}) after {len(results)} of {len(manifest)} cases; next: "
      f"{manifest[len(results)] if len(results) < len(manifest) else None}\n{proc.stderr[-3000:]}")
  return results


def _show(r):
  return f"{r['kind']}/{r['label']}: {r['outcome']} {r.get('type', '')} {r['message'][:300]}"


def test_no_damaged_file_is_a_traceback_or_a_hang(outcomes):
  bugs = [r for r in outcomes if r["outcome"] == "bug"]
  assert not bugs, f"{len(bugs)} of {len(outcomes)} cases raised a non-user error:\n" + "\n".join(
      _show(r) + "\n" + r["traceback"] for r in bugs[:5])
  slow = [r for r in outcomes if r["seconds"] > 10]
  assert not slow, [(_show(r), r["seconds"]) for r in slow]


def test_each_refusal_is_one_line_naming_the_file(outcomes):
  wrong = []
  for r in outcomes:
    if r["outcome"] == "refused":
      named = r["message"].startswith(r["path"] + ": ")
      if r["kind"] == "position" or r["kind"] == "loop":  # restore_data may name the iterator state instead
        named = named or r["message"].startswith(os.path.dirname(r["path"]))
      if not named or "\n" in r["message"] or len(r["message"]) > 600:
        wrong.append(_show(r))
    if r["outcome"] == "warned" and "\n" in r["message"]:
      wrong.append(_show(r))
  assert not wrong, "\n".join(wrong[:20])


def test_structural_damage_is_never_used(outcomes):
  """Empty, binary, non-UTF-8, truncated JSON, wrong types: refused (the loop state: warned, and not used)."""
  used = [r for r in outcomes if r["must_refuse"] and r["outcome"] == "ok"]
  assert not used, f"{len(used)} damaged files were used:\n" + "\n".join(_show(r) for r in used[:30])
  by_kind = {}
  for r in outcomes:
    by_kind.setdefault(r["kind"], set()).add(r["outcome"])
  assert by_kind["loop"] <= {"warned", "ok"} and all("warned" not in v for k, v in by_kind.items() if k != "loop")
  goods = {r["kind"]: r for r in outcomes if r["label"] == "good"}
  assert all(r["outcome"] == "ok" for r in goods.values()), [_show(r) for r in goods.values() if r["outcome"] != "ok"]
  assert len(outcomes) > 1500, len(outcomes)


# --- Through main.py: exit status 2, one `error:` line naming the file, no traceback. -------------------

def _main(*args, cwd=None):
  return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], capture_output=True, text=True, env=ENV,
                        timeout=300, cwd=cwd)


def _one_line(run, path):
  errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
  assert run.returncode == 2, run.stderr[-3000:]
  assert "Traceback" not in run.stderr, run.stderr[-3000:]
  assert len(errors) == 1 and errors[0].startswith(f"error: {path}: "), run.stderr[-3000:]
  return errors[0]


def test_predict_with_a_damaged_export_card(tmp_path):
  path = _write_case(tmp_path / "exported", "export_card", b'{"export": {"format": "vfocal_jax.export/1"}, "fie')
  _one_line(_main("predict", f"--exported={path.parent}", f"--video={tmp_path / 'a.mp4'}"), path)


def test_train_with_a_damaged_demo_marker(tmp_path):
  done = tmp_path / "demo" / "DONE"
  done.parent.mkdir()
  done.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
  line = _one_line(_main("train", "--config=demo", f"--workdir={tmp_path / 'w'}",
                         f"--config.demo_data_dir={done.parent}"), done)
  assert "delete" in line and not (tmp_path / "w").exists()


def test_predict_with_a_binary_video_list(tmp_path):
  listing = tmp_path / "videos.csv"
  listing.write_bytes(bytes(range(256)))
  _one_line(_main("predict", f"--checkpoint={tmp_path}", f"--video={listing}"), listing)


def test_predict_with_a_workdir_whose_config_json_is_a_list(tmp_path):
  path = _write_case(tmp_path / "run", "config_json", b"[1, 2]")
  _one_line(_main("predict", f"--workdir={path.parent}", f"--video={tmp_path / 'a.mp4'}"), path)


def test_a_config_file_whose_get_config_returns_a_list(tmp_path):
  config = tmp_path / "my_config.py"
  config.write_text("def get_config():\n  return [1, 2]\n")
  _one_line(_main("summary", f"--config={config}"), config)
