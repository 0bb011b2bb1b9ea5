"""gs:// end to end, against a Cloud Storage server on 127.0.0.1 (tests/gcs_emulator.py), through the CLI.

Every storage client of the stack is the real one, in a subprocess started
with the emulator's environment: TensorFlow's GCS file system (tf.data
records, tf.io.gfile listing, tf.io writers, tf.summary events, the tf.data
iterator checkpoint, and etils.epath: Orbax's metadata, config.json, model
cards, results, PNGs), tensorstore (Orbax's arrays) and google-cloud-storage
(Orbax's bucket check). A server that cannot start is an error, not a skip.

  data     demo videos and CSVs in the bucket -> make_shards (CSV, videos, label
           map read from gs://; shards, labels.txt, dataset_info.json written
           there; a text file refused) -> the pipeline on gs:// specs; a tfds
           dataset prepared into and read from a gs:// data_dir
  train    data and workdir in the bucket, SIGKILL once the first checkpoint
           is committed, the same command again resumes, evaluates, and
           eval_results.json lands in the bucket
  convert  a .pth in the bucket -> a converted checkpoint in the bucket ->
           eval and predict from it (videos, a CSV list and --output_csv in the bucket)
"""
import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from gcs_emulator import describe, python_env, run_python
from helpers import ROOT
BUCKET = "vfocal-test"
B = f"gs://{BUCKET}"
NUM_CLASSES = 8
# The demo config, shrunk (as the tiny settings of test_train_resume / test_predict).
TINY = ["--config=demo", "--config.num_frames=4", "--config.image_size=32", "--config.model.embed_dim=16",
        "--config.model.depths=(1,1,1,1)",
        "--config.batch_size=8", "--config.eval_batch_size=8", "--config.data.shuffle_buffer_size=16",
        "--config.data.num_threads=1", "--config.warmup_steps=0"]
TRAIN_STEPS, CHECKPOINT_EVERY = 60, 15   # steps are fast: the kill lands while 45 more and 3 saves run
# One CPU device in the subprocesses: compiling for the 8 simulated devices of the other tests
# doubles the CPU time of every command, and the mesh is not what this file tests.
ENV = {"JAX_NUM_CPU_DEVICES": "1"}


@pytest.fixture(scope="module")
def gcs(gcs):
  """The module's emulator (conftest) with the bucket."""
  gcs.create_bucket(BUCKET)
  return gcs


def _cli(gcs, *args, timeout=600, check=True):
  return run_python(gcs, ["main.py", *args], timeout=timeout, check=check, extra_env=ENV)


@pytest.fixture(scope="module")
def raw(gcs, tmp_path_factory):
  """Demo videos (one per class per split, mp4) and their CSVs in gs://.../raw, plus a text file."""
  from vfocal_jax.data.demo_dataset import CLASS_NAMES, render_video, write_mp4
  local = tmp_path_factory.mktemp("raw")
  rng = np.random.default_rng(0)
  lines = {"train": [], "val": []}
  for split, copies in (("train", 2), ("val", 1)):
    for i in range(copies * NUM_CLASSES):
      name = f"videos/{split}_{i:02d}.mp4"
      os.makedirs(local / "videos", exist_ok=True)
      write_mp4(str(local / name), render_video(i % NUM_CLASSES, rng, num_frames=8, height=32, width=40))
      lines[split].append(f"{name},{CLASS_NAMES[i % NUM_CLASSES]}\n")
  (local / "videos" / "notes.txt").write_text("Not a video, though FFmpeg opens it as ANSI art.\n" * 10)
  lines["train"].insert(3, "videos/notes.txt,grow\n")
  (local / "train.csv").write_text("path,label\n" + "".join(lines["train"]))
  (local / "val.csv").write_text("".join(lines["val"]))
  gcs.upload_tree(local, f"{B}/raw")
  return {"local": local, "val_videos": [line.split(",")[0] for line in lines["val"]]}


DATA_SCRIPT = r"""
import json, sys
from vfocal_jax.configs import data as data_config
from vfocal_jax.data import make_shards, tfds_builder
from vfocal_jax import input_pipeline as ip
from vfocal_jax.input_pipeline import sources

B = sys.argv[1]
out = {}
out["train"] = make_shards.make_shards(f"{B}/raw/train.csv", f"{B}/data/train", 2, video_root=f"{B}/raw",
                                       short_side=None, workers=1, progress=False)
out["val"] = make_shards.make_shards(f"{B}/raw/val.csv", f"{B}/data/val", 1, video_root=f"{B}/raw",
                                     short_side=None, workers=1, progress=False,
                                     label_map=f"{B}/data/train/labels.txt")
files = sources.list_shards(f"{B}/data/train")
out["specs"] = [files, sources.list_shards(f"{B}/data/train/shard-*"),
                sources.list_shards(f"{files[0]},{B}/data/train/*-00001-*")]
cfg = data_config.get_config()
cfg.train_shards, cfg.eval_shards, cfg.num_threads = f"{B}/data/train", f"{B}/data/val", 1
info = ip.get_dataset_info(cfg, "eval")
batches = list(ip.create_eval_iterator(cfg, batch_size=4, num_frames=4, image_size=32, num_clips=1, num_crops=1))
out["eval"] = dict(num_examples=info.num_examples, names=list(info.label_names),
                   labels=sorted(int(l) for b in batches for l in b["label"][b["mask"]]))
train = next(ip.create_train_iterator(cfg, batch_size=4, seed=0, num_frames=4, image_size=32))
out["train_batch"] = list(train["video"].shape)

# tfds: prepared into a gs:// data_dir from gs:// CSVs and videos, read back by name.
tfds_builder.prepare(f"{B}/tfds", {"test": f"{B}/raw/val.csv"}, f"{B}/raw", short_side=None)
tcfg = data_config.get_config()
tcfg.source, tcfg.tfds_name, tcfg.tfds_data_dir, tcfg.num_threads = "tfds", "video_csv", f"{B}/tfds", 1
tinfo = ip.get_dataset_info(tcfg, "eval")
tb = list(ip.create_eval_iterator(tcfg, batch_size=4, num_frames=4, image_size=32, num_clips=1, num_crops=1))
out["tfds"] = dict(num_examples=tinfo.num_examples, num_classes=tinfo.num_classes,
                   seen=sum(int(b["mask"].sum()) for b in tb))
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def shards(gcs, raw):
  """Runs DATA_SCRIPT (make_shards into the bucket, the pipeline and tfds on gs://); returns what it printed."""
  proc = run_python(gcs, ["-c", DATA_SCRIPT, B], timeout=600, extra_env=ENV)
  line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


def test_make_shards_and_the_pipeline_in_the_bucket(gcs, shards):
  from vfocal_jax.data.demo_dataset import CLASS_NAMES
  train = shards["train"]
  assert train["num_examples"] == 2 * NUM_CLASSES and train["num_failed"] == 1
  assert train["label_names"] == list(CLASS_NAMES) and train["source_csv"] == f"{B}/raw/train.csv"
  # What landed in the bucket, read back through the emulator's own API.
  listing = gcs.list(f"{B}/data/")
  for name in ("train/labels.txt", "train/dataset_info.json", "train/failed_videos.txt",
               "train/shard-00000-of-00002.tfrecord", "train/shard-00001-of-00002.tfrecord",
               "val/shard-00000-of-00001.tfrecord", "val/dataset_info.json"):
    assert f"{B}/data/{name}" in listing, name
  assert not [u for u in listing if u.endswith(".tmp")]
  assert json.loads(gcs.download(f"{B}/data/train/dataset_info.json")) == train
  assert gcs.download(f"{B}/data/train/labels.txt").decode().split() == list(CLASS_NAMES)
  failed = gcs.download(f"{B}/data/train/failed_videos.txt").decode().splitlines()
  assert len(failed) == 1 and failed[0].startswith("videos/notes.txt\t") and "not a video" in failed[0]
  # The pipeline: directory, glob and comma list name the same objects; eval sees every video once.
  files = shards["specs"][0]
  assert files == [f"{B}/data/train/shard-0000{i}-of-00002.tfrecord" for i in range(2)]
  assert shards["specs"][1] == shards["specs"][2] == files
  assert shards["eval"] == dict(num_examples=NUM_CLASSES, names=list(CLASS_NAMES), labels=list(range(NUM_CLASSES)))
  assert shards["train_batch"] == [4, 4, 32, 32, 3]
  assert shards["tfds"] == dict(num_examples=NUM_CLASSES, num_classes=NUM_CLASSES, seen=NUM_CLASSES)
  assert [u for u in gcs.list(f"{B}/tfds/video_csv/") if u.endswith("dataset_info.json")]
  assert not gcs.refused


def _committed_steps(gcs, workdir):
  return sorted(int(u.split("/")[-2]) for u in gcs.list(f"{workdir}/checkpoints/")
                if u.endswith("/commit_success.txt") and u.split("/")[-2].isdigit())


LOGGED = r"step (\d+)/\d+: loss ([0-9.]+)"
LOG_EVERY = 10


def test_train_killed_and_resumed_in_the_bucket(gcs, shards):
  workdir = f"{B}/run"
  args = ["main.py", "train", *TINY, f"--workdir={workdir}", f"--config.data.train_shards={B}/data/train",
          f"--config.data.eval_shards={B}/data/val", f"--config.num_train_steps={TRAIN_STEPS}",
          f"--config.checkpoint_every_steps={CHECKPOINT_EVERY}", f"--config.log_every_steps={LOG_EVERY}",
          "--config.keep_checkpoints=2"]
  cmd = [sys.executable, *args]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=python_env(gcs, ENV), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, stdin=subprocess.DEVNULL)
  lines = []
  reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
  reader.start()
  # Killed once a step after the last committed checkpoint has been logged, so that the resumed run logs
  # some of the same steps. Checked with the process stopped (SIGSTOP): nothing commits or logs meanwhile.
  deadline = time.monotonic() + 600
  try:
    while True:
      if proc.poll() is not None or time.monotonic() > deadline:
        proc.kill()
        proc.wait()
        reader.join(10)
        raise AssertionError("the run was not killed after a checkpoint and a later logged step: it "
                             f"{'ended' if proc.returncode is not None else 'timed out'}:\n"
                             + describe(cmd, proc.returncode, "", "".join(lines), gcs))
      if _committed_steps(gcs, workdir):
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(0.5)    # the reader drains what was written before the stop, the server what was sent
        committed = _committed_steps(gcs, workdir)
        if [s for s in re.findall(LOGGED, "".join(lines)) if int(s[0]) > max(committed)]:
          break
        os.kill(proc.pid, signal.SIGCONT)
      time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)     # no SIGTERM handler runs: a hard preemption
  finally:
    proc.wait()
    reader.join(10)
  err = "".join(lines)
  assert proc.returncode == -signal.SIGKILL
  killed_at = _committed_steps(gcs, workdir)
  assert killed_at == committed and max(killed_at) < TRAIN_STEPS
  assert not gcs.exists(f"{workdir}/eval_results.json")

  # The same command again: resumes from the bucket, finishes, evaluates.
  second = run_python(gcs, args, timeout=600, extra_env=ENV)
  log = second.stderr
  resumed = max(killed_at)
  assert f"Resuming at step {resumed}" in log, describe(cmd, 0, second.stdout, log, gcs)
  # Same data order and rng after the restore (model, optimizer and iterator state from the bucket):
  # the steps both runs logged have the same loss.
  losses = [{int(s): loss for s, loss in re.findall(LOGGED, text)} for text in (err, log)]
  assert sorted(losses[1]) == list(range(resumed // LOG_EVERY * LOG_EVERY + LOG_EVERY, TRAIN_STEPS + 1, LOG_EVERY))
  common = sorted(set(losses[0]) & set(losses[1]))
  assert common and common[0] == min(losses[1]), (losses, killed_at)
  assert [losses[0][s] for s in common] == [losses[1][s] for s in common], (losses, killed_at)
  results = json.loads(gcs.download(f"{workdir}/eval_results.json"))
  assert results["step"] == TRAIN_STEPS and results["num_videos"] == NUM_CLASSES
  config = json.loads(gcs.download(f"{workdir}/config.json"))
  assert config["data"]["train_shards"] == f"{B}/data/train" and config["model"]["embed_dim"] == 16
  listing = gcs.list(f"{workdir}/")
  assert f"{workdir}/model_card.json" in listing
  assert any("events.out.tfevents" in u for u in listing)                 # TensorBoard, via tf.summary
  assert TRAIN_STEPS in _committed_steps(gcs, workdir)
  assert any(u.startswith(f"{workdir}/checkpoints/{TRAIN_STEPS}/") and "/data" in u for u in listing), \
      "no input-iterator state in the final checkpoint"
  assert not gcs.refused


def _torch_checkpoint(path):
  """A tiny Video-FocalNet of the TINY architecture in the official key layout, as the released files;
  returns the PyTorch model."""
  import torch  # pylint: disable=import-outside-toplevel
  from benchmarks import torch_video_focalnet as tvf
  torch.manual_seed(0)
  model = tvf.VideoFocalNet(num_frames=4, tubelet_size=2, embed_dim=16, depths=(1, 1, 1, 1),
                            num_classes=NUM_CLASSES)
  model = tvf.randomize_(model, seed=0).eval()
  torch.save({"model": model.state_dict(), "epoch": 1}, path)
  return model


# The converted checkpoint read back from the bucket: its weights in the official layout, and its float32 logits.
CONVERTED_SCRIPT = r"""
import sys
import jax.numpy as jnp
import numpy as np
from vfocal_jax import resolve
from vfocal_jax.configs import demo
from vfocal_jax.convert.mapping import flax_to_torch_state_dict
checkpoint, video, out = sys.argv[1:4]
loaded = resolve.artifact(resolve.UserConfig(demo.get_config()), checkpoint=checkpoint)
model = loaded.model.clone(dtype=jnp.float32)
logits = model.apply({"params": loaded.params}, np.load(video), train=False)
weights = flax_to_torch_state_dict({"params": loaded.params}, model)
np.savez(out, logits=np.asarray(logits), **{"weight:" + k: v for k, v in weights.items()})
"""


def test_convert_eval_and_predict_from_the_bucket(gcs, shards, raw, tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  pth = tmp_path / "tiny.pth"
  source = _torch_checkpoint(pth)
  gcs.upload_file(pth, f"{B}/released/tiny.pth")
  converted = f"{B}/converted/tiny"
  _cli(gcs, "convert", *TINY, f"--pth={B}/released/tiny.pth", f"--output_dir={converted}",
       f"--labels={B}/data/train/labels.txt")
  listing = gcs.list(f"{converted}/")
  assert f"{converted}/model_card.json" in listing and any(u.startswith(f"{converted}/params/") for u in listing)
  # What was converted is the source: every weight bit for bit, and the logits of PyTorch's forward.
  video = np.random.default_rng(0).normal(size=(2, 4, 32, 32, 3)).astype(np.float32)
  np.save(tmp_path / "video.npy", video)
  run_python(gcs, ["-c", CONVERTED_SCRIPT, converted, str(tmp_path / "video.npy"), str(tmp_path / "out.npz")],
             timeout=600, extra_env=ENV)
  got = np.load(tmp_path / "out.npz")
  state = source.state_dict()
  assert {k[len("weight:"):] for k in got.files if k.startswith("weight:")} == set(state)
  for key, value in state.items():
    np.testing.assert_array_equal(got["weight:" + key], value.numpy(), err_msg=key)
  with torch.no_grad():
    expected = source(torch.from_numpy(video).permute(0, 1, 4, 2, 3)).numpy()
  assert np.abs(expected).max() > 0.1
  np.testing.assert_allclose(got["logits"], expected, rtol=0, atol=5e-5)

  _cli(gcs, "eval", *TINY, f"--checkpoint={converted}", f"--config.data.eval_shards={B}/data/val",
       f"--workdir={B}/eval_converted")
  results = json.loads(gcs.download(f"{B}/eval_converted/eval_results.json"))
  assert results["num_videos"] == NUM_CLASSES and results["checkpoint"].startswith(converted)

  # predict: a CSV list in the bucket (relative paths, one gs:// URL, one text file), CSV out to the bucket.
  videos = raw["val_videos"][:3]
  listing_csv = "path,label\n" + "".join(f"{v},0\n" for v in videos[:2]) + f"{B}/raw/{videos[2]},0\n" \
      + "videos/notes.txt,0\n"
  gcs.upload(f"{B}/raw/predict.csv", listing_csv.encode())
  out_csv = f"{B}/predictions/out.csv"
  proc = _cli(gcs, "predict", f"--checkpoint={converted}", f"--video={B}/raw/predict.csv",
              f"--output_csv={out_csv}", check=False)
  assert proc.returncode == 1, describe(["predict"], proc.returncode, proc.stdout, proc.stderr, gcs)  # notes.txt
  rows = list(csv.DictReader(io.StringIO(gcs.download(out_csv).decode())))
  assert [r["video"] for r in rows] == [f"{B}/raw/{v}" for v in videos] + [f"{B}/raw/videos/notes.txt"]
  assert all(r["error"] == "" and r["class_1"] for r in rows[:3]) and rows[3]["error"]
  assert not gcs.refused
