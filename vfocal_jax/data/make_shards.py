r"""Turns a folder of videos + a CSV (`path,label` per line) into TFRecord shards.

    vfocal make_shards --csv train.csv --video_root videos/ \
        --output_dir shards/train --num_shards 64 [--short_side 256] \
        [--max_fps 30] [--frames_per_video 32] [--jpeg_quality 90] [--workers 8] \
        [--label_map shards/train/labels.txt]

(or ``python -m vfocal_jax.data.make_shards ...``; the flags are declared in ``vfocal_jax/cli.py``).

Each video is decoded with PyAV (FFmpeg), resized so its short side has
`--short_side` pixels, JPEG-encoded frame by frame and written as one
`tf.train.SequenceExample` (format: `vfocal_jax/input_pipeline/shard_format.py`).

* `--frames_per_video=M` keeps M frames of each video, the centres of M equal
  segments (a video of at most M frames keeps them all), with their indices
  and the video's frame count: a record is about M / N of the whole video's,
  and segment sampling draws among the kept frames (`input_pipeline/sampling.py`).
  0 (the default) keeps every frame.

* Every path may be a local path or a ``gs://`` URL: the CSV, `--video_root`
  and the videos (read through etils.epath), `--label_map`, and `--output_dir`
  (shards, `labels.txt`, `dataset_info.json`, `failed_videos.txt`, all
  written with `tf.io`).

* Labels: integers are used as they are; names are mapped to indices in
  sorted order and the map is written as `labels.txt` beside the shards. Pass
  that file with `--label_map` when writing another split so both agree.
* A video that cannot be read (missing, corrupt, not a video at all, e.g. a
  text file, or with an unknown label) is listed with the reason in
  `failed_videos.txt` and not written; the run goes on and says how many failed.
* Re-running resumes: a shard is written to a temporary name and renamed when
  complete, so finished shards are kept and only missing ones are written
  (a shard whose videos or settings changed is written again).
* `dataset_info.json` records the per-shard counts (the eval pipeline uses
  them to pad every host to the same number of batches), the class names and
  `frames_per_video`.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import random
import sys
from collections.abc import Callable, Sequence

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Before TensorFlow is imported.
import tensorflow as tf  # noqa: E402

from vfocal_jax import errors  # noqa: E402
from vfocal_jax.input_pipeline import shard_format, sources  # noqa: E402

REPORT_FILENAME = "failed_videos.txt"


@dataclasses.dataclass(frozen=True)
class VideoEntry:
  """One line of the CSV, resolved."""
  path: str           # as written in the CSV (stored as video/filename)
  full_path: str      # joined with the video root
  label: int          # class index, or -1 when the label is unknown
  label_text: str | None


def read_csv(csv_path: str) -> list[tuple[str, str]]:
  """Reads `path,label` lines (official layout); blank lines and `#` comments are skipped.

  A first line whose label is literally `label` is treated as a header.
  """
  rows = []
  for line_no, line in enumerate(sources.read_text(sources.expand(csv_path)).splitlines(), 1):
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    if "," not in line:
      raise errors.BadFileError(f"{csv_path}:{line_no}", f"expected 'path,label', got {line!r:.80}")
    path, label = line.rsplit(",", 1)
    if line_no == 1 and label.strip().lower() == "label":
      continue
    rows.append((path.strip(), label.strip()))
  return rows


def load_label_map(path: str) -> list[str]:
  """Class names, one per line (line i is class i), checked (``sources.read_label_map``)."""
  return list(sources.read_label_map(sources.expand(path)))


def build_label_names(labels: Sequence[str]) -> list[str] | None:
  """Sorted unique names, or None when every label is already an integer."""
  if all(_is_int(x) for x in labels):
    return None
  return sorted(set(labels))


def _is_int(text: str) -> bool:
  try:
    int(text)
    return True
  except ValueError:
    return False


def resolve_entries(rows: Sequence[tuple[str, str]], video_root: str | None,
                    label_names: list[str] | None) -> list[VideoEntry]:
  """Maps each CSV row to a class index (-1 if the label is not in the map).

  Paths are taken relative to `video_root` (local or ``gs://``) unless absolute or URLs.
  """
  index = {name: i for i, name in enumerate(label_names or [])}
  entries = []
  for path, label in rows:
    absolute = os.path.isabs(path) or sources.is_url(path)
    full = path if (absolute or not video_root) else sources.join(sources.expand(video_root), path)
    if _is_int(label):
      i = int(label)
      text = label_names[i] if label_names and 0 <= i < len(label_names) else None
      if label_names and not 0 <= i < len(label_names):
        i = -1
    else:
      i = index.get(label, -1)
      text = label
    entries.append(VideoEntry(path, full, i, text))
  return entries


def shard_name(i: int, num_shards: int) -> str:
  return f"shard-{i:05d}-of-{num_shards:05d}.tfrecord"


def assign_shards(entries: Sequence[VideoEntry], num_shards: int, seed: int) -> list[list[VideoEntry]]:
  """Spreads videos over shards round-robin after a seeded shuffle.

  CSVs are often sorted by class; shuffling once here mixes classes inside
  every shard, so file-level shuffling in the pipeline is enough.
  """
  order = list(range(len(entries)))
  random.Random(seed).shuffle(order)
  shards: list[list[VideoEntry]] = [[] for _ in range(num_shards)]
  for k, i in enumerate(order):
    shards[k % num_shards].append(entries[i])
  return shards


def stored_frame_indices(num_frames: int, frames_per_video: int) -> np.ndarray:
  """Which frames a record keeps: the centre floor((k + 1/2) N / M) of each of M equal
  segments of the N frames, increasing; every frame when M = 0 or N <= M."""
  if frames_per_video <= 0 or num_frames <= frames_per_video:
    return np.arange(num_frames, dtype=np.int64)
  k = np.arange(frames_per_video, dtype=np.int64)
  return (2 * k + 1) * num_frames // (2 * frames_per_video)


def _encode_jpegs(frames: np.ndarray, quality: int) -> list[bytes]:
  return [tf.io.encode_jpeg(f, quality=quality).numpy() for f in frames]


def write_shard(output_path: str, entries: Sequence[VideoEntry], *, short_side: int | None,
                max_fps: float | None, jpeg_quality: int, frames_per_video: int = 0, fingerprint: str = "",
                decode_fn: Callable[..., np.ndarray] | None = None) -> dict:
  """Writes one shard (local or ``gs://``) under a temporary name, then renames it; returns its stats.

  `frames_per_video` > 0 keeps that many frames of each video (`stored_frame_indices`)
  and records their indices and the video's frame count.

  The stats (count, frames, failed videos) are also written beside the shard
  as `<shard>.json`; a shard is complete when that file exists. A video
  that cannot be decoded (VideoDecodeError: missing, corrupt, not a video)
  is listed in the stats and not written.
  """
  tf.config.set_visible_devices([], "GPU")
  from vfocal_jax.input_pipeline.video_io import VideoDecodeError, decode_video_file
  decode_fn = decode_fn or decode_video_file

  count, num_frames, num_video_frames, failed = 0, 0, 0, []
  tmp_path = output_path + ".tmp"
  with tf.io.TFRecordWriter(tmp_path) as writer:
    for entry in entries:
      if entry.label < 0:
        failed.append((entry.path, f"label {entry.label_text!r} not in the label map"))
        continue
      try:
        frames = decode_fn(entry.full_path, short_side=short_side, max_fps=max_fps)
      except VideoDecodeError as e:
        failed.append((entry.path, str(e)))
        continue
      except Exception as e:  # Keep going whatever the decoder throws.
        failed.append((entry.path, f"{type(e).__name__}: {e}"))
        continue
      kept = {}
      if frames_per_video > 0:
        index = stored_frame_indices(len(frames), frames_per_video)
        kept = dict(frame_index=index.tolist(), num_video_frames=len(frames))
        num_video_frames += len(frames)
        frames = frames[index]
      example = shard_format.make_sequence_example(
          _encode_jpegs(frames, jpeg_quality), entry.label, label_text=entry.label_text,
          filename=entry.path, **kept)
      writer.write(example.SerializeToString())
      count += 1
      num_frames += len(frames)
  stats = {"shard": sources.basename(output_path), "num_examples": count,
           "num_frames": num_frames, "num_video_frames": num_video_frames or num_frames,
           "failed": failed, "fingerprint": fingerprint}
  tf.io.gfile.rename(tmp_path, output_path, overwrite=True)
  sources.write_text(output_path + ".json", json.dumps(stats))
  return stats


def _fingerprint(entries: Sequence[VideoEntry], settings: dict) -> str:
  """Identifies a shard's content: its videos, labels and the writer settings."""
  import hashlib
  text = json.dumps([[e.path, e.label] for e in entries] + [sorted(settings.items())])
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_json(path: str) -> dict | None:
  try:
    return json.loads(sources.read_text(path))
  except (OSError, ValueError, tf.errors.OpError):
    return None


def _write_shard_job(args: tuple) -> dict:
  output_path, entries, kwargs = args
  return write_shard(output_path, entries, **kwargs)


def make_shards(csv: str, output_dir: str, num_shards: int, *, video_root: str | None = None,
                short_side: int | None = 256, max_fps: float | None = None, jpeg_quality: int = 90,
                frames_per_video: int = 0, workers: int = 1, label_map: str | None = None,
                shuffle_seed: int = 0, progress: bool = True) -> dict:
  """Writes the shards of one split; returns the summary also saved as dataset_info.json.

  Args:
    csv: `path,label` per line (label: integer index or class name).
    output_dir: where shards, `labels.txt`, `dataset_info.json` and
      `failed_videos.txt` go (local or ``gs://``; so may the other paths be).
    num_shards: number of TFRecord files (use at least the number of hosts
      that will read the split; more spreads the reading better).
    video_root: directory the CSV paths are relative to.
    short_side: resize frames so that the shorter side has this many pixels
      (None keeps the original size).
    max_fps: drop frames of faster videos to at most this rate.
    jpeg_quality: 1..100.
    frames_per_video: keep this many frames of each video, the centres of as
      many equal segments (0: every frame).
    workers: parallel processes (1: in this process).
    label_map: an existing `labels.txt` to use instead of building one.
    shuffle_seed: seed of the video -> shard assignment.
    progress: show a progress bar.
  """
  output_dir = sources.expand(output_dir)
  tf.io.gfile.makedirs(output_dir)
  rows = read_csv(csv)
  if label_map:
    label_names = load_label_map(label_map)
  else:
    label_names = build_label_names([label for _, label in rows])
  if label_names is not None:
    sources.write_text(sources.join(output_dir, shard_format.LABELS_FILENAME),
                       "".join(name + "\n" for name in label_names))
  entries = resolve_entries(rows, video_root, label_names)
  shards = assign_shards(entries, num_shards, shuffle_seed)
  if frames_per_video < 0:
    raise errors.FlagError(f"--frames_per_video={frames_per_video}: expected 0 (every frame) or a positive count")
  kwargs = dict(short_side=short_side, max_fps=max_fps, jpeg_quality=jpeg_quality)
  if frames_per_video:  # Not in the fingerprint at 0: shards written before the option stay valid.
    kwargs["frames_per_video"] = int(frames_per_video)

  jobs, stats = [], {}
  for i, shard_entries in enumerate(shards):
    path = sources.join(output_dir, shard_name(i, num_shards))
    fingerprint = _fingerprint(shard_entries, kwargs)
    done = _read_json(path + ".json") if tf.io.gfile.exists(path) else None
    if done is not None and done.get("fingerprint") == fingerprint:
      stats[i] = done  # Finished by an earlier run with the same videos and settings: keep it.
    else:
      jobs.append((i, (path, shard_entries, dict(kwargs, fingerprint=fingerprint))))

  bar = _progress_bar(total=len(entries), initial=sum(len(shards[i]) for i in stats),
                      enabled=progress)
  if workers <= 1 or len(jobs) <= 1:
    for i, job in jobs:
      stats[i] = _write_shard_job(job)
      bar.update(len(shards[i]))
  else:
    ctx = multiprocessing.get_context("spawn")  # TF is not fork-safe.
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
      futures = {pool.submit(_write_shard_job, job): i for i, job in jobs}
      for future in concurrent.futures.as_completed(futures):
        i = futures[future]
        stats[i] = future.result()
        bar.update(len(shards[i]))
  bar.close()

  failed = [tuple(x) for i in sorted(stats) for x in stats[i]["failed"]]
  sources.write_text(sources.join(output_dir, REPORT_FILENAME),
                     "".join(f"{path}\t{reason}\n" for path, reason in failed))
  num_examples = sum(s["num_examples"] for s in stats.values())
  max_label = max((e.label for e in entries), default=-1)
  info = {
      "num_examples": num_examples,
      "num_failed": len(failed),
      "num_classes": len(label_names) if label_names is not None else max_label + 1,
      "label_names": label_names,
      "shards": {stats[i]["shard"]: stats[i]["num_examples"] for i in sorted(stats)},
      "num_frames": sum(s["num_frames"] for s in stats.values()),
      "num_video_frames": sum(s.get("num_video_frames", s["num_frames"]) for s in stats.values()),
      "frames_per_video": int(frames_per_video),
      "short_side": short_side,
      "max_fps": max_fps,
      "jpeg_quality": jpeg_quality,
      "source_csv": csv if sources.is_url(csv) else os.path.abspath(os.path.expanduser(csv)),
  }
  sources.write_text(sources.join(output_dir, shard_format.INFO_FILENAME), json.dumps(info, indent=1))
  message = (f"{output_dir}: wrote {num_examples} videos in {num_shards} shards; "
             f"{len(failed)} could not be read (listed in {REPORT_FILENAME})")
  print(message, file=sys.stderr)
  return info


def _progress_bar(total: int, initial: int, enabled: bool):
  """tqdm when available (it comes with tensorflow-datasets), else a no-op."""
  try:
    from tqdm import auto as tqdm
    return tqdm.tqdm(total=total, initial=initial, unit="video", disable=not enabled)
  except ImportError:  # pragma: no cover
    class _NoBar:
      def update(self, n): pass
      def close(self): pass
    return _NoBar()


if __name__ == "__main__":  # The `vfocal make_shards` command (its flags: `vfocal make_shards --helpfull`).
  from vfocal_jax import cli
  cli.run([sys.argv[0], "make_shards", *sys.argv[1:]])
