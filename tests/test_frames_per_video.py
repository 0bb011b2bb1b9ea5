"""make_shards --frames_per_video=M and segment sampling on the frames it keeps.

Videos whose frames say their index (tests/numbered_videos.py) go through the real writer with
M = 0 (every frame) and M = 12; what the pipeline samples is read back from the pixels and compared
with the rule computed here with exact fractions, independently of the TF code.
"""
import json
import math
import os
import shutil
from fractions import Fraction

import numpy as np
import pytest
import tensorflow as tf

import numbered_videos
from helpers import data_config
from vfocal_jax import input_pipeline as ip
from vfocal_jax.data import make_shards
from vfocal_jax.input_pipeline import sampling, shard_format

LENGTHS = [30, 24, 7]      # video v has LENGTHS[v] frames; 7 <= M keeps every frame
M = 12
T = 4                      # clip length


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  root = tmp_path_factory.mktemp("fpv")
  lines = numbered_videos.write_numbered_videos(root, LENGTHS, 32, 48, label=lambda vid: vid)
  (root / "all.csv").write_text("".join(lines))
  out = {}
  for m in (0, M):
    out[m] = str(root / f"m{m}")
    make_shards.make_shards(str(root / "all.csv"), out[m], 2, video_root=str(root), short_side=None,
                            frames_per_video=m, workers=1, progress=False)
  return out


def _cfg(directory, **fields):
  return data_config(directory, shuffle_buffer_size=4, log_skipped=False, **fields)


def _centres(n, m):
  """floor((k + 1/2) n / m): the centre of each of m equal segments."""
  return [math.floor((k + Fraction(1, 2)) * n / m) for k in range(m)] if 0 < m < n else list(range(n))


def _nearest(stored, x):
  return min(stored, key=lambda s: (abs(s - x), s))


def _test_frames(n, m, clips):
  """What test sampling must pick: the official test point of the whole video, nearest stored frame."""
  stored, avg = _centres(n, m), Fraction(n, T)
  return [[_nearest(stored, math.floor(t * avg + avg * (k + Fraction(1, 2)) / clips)) for t in range(T)]
          for k in range(clips)]


def _candidates(n, m):
  """Per segment [t n / T, (t + 1) n / T): the stored frames inside it, else the nearest to its centre."""
  stored = _centres(n, m)
  out = []
  for t in range(T):
    inside = [s for s in stored if Fraction(t * n, T) <= s < Fraction((t + 1) * n, T)]
    out.append(set(inside) or {_nearest(stored, math.floor(t * Fraction(n, T) + Fraction(n, 2 * T)))})
  return out


def _read_records(directory):
  out = {}
  for f in sorted(tf.io.gfile.glob(os.path.join(directory, "*.tfrecord"))):
    for record in tf.data.TFRecordDataset(f):
      ex = shard_format.parse_sequence_example(record)
      frames = np.stack([tf.io.decode_jpeg(j).numpy() for j in ex["frames"]]).astype(float)
      out[int(ex["label"])] = (numbered_videos.frame_number(frames), ex["frame_index"].numpy(),
                               int(ex["num_video_frames"]), record.numpy())
  return out


def test_writer_keeps_segment_centres_and_records_m(shards):
  kept = _read_records(shards[M])
  full = _read_records(shards[0])
  for vid, n in enumerate(LENGTHS):
    frames, index, count, _ = kept[vid]
    np.testing.assert_array_equal(frames, _centres(n, M))
    np.testing.assert_array_equal(index, _centres(n, M))
    assert count == n
    frames, index, count, record = full[vid]     # M = 0: today's layout, no new features
    np.testing.assert_array_equal(frames, np.arange(n))
    assert index.size == 0 and count == -1
    context = tf.train.SequenceExample.FromString(record).context.feature
    assert shard_format.FRAME_INDEX_KEY not in context and shard_format.NUM_FRAMES_KEY not in context
  for m in (0, M):
    info = json.loads(open(os.path.join(shards[m], shard_format.INFO_FILENAME)).read())
    assert info["frames_per_video"] == m and info["num_video_frames"] == sum(LENGTHS)
    assert info["num_frames"] == sum(len(_centres(n, m)) for n in LENGTHS)


def _train_draws(directory, seed, batches=4):
  """{video: list of sampled frame-number tuples} from the training iterator."""
  it = ip.create_train_iterator(_cfg(directory), batch_size=15, seed=seed, num_frames=T, image_size=16)
  out = {v: [] for v in range(len(LENGTHS))}
  for _ in range(batches):
    batch = next(it)
    for label, clip in zip(batch["label"], numbered_videos.frame_number(batch["video"].astype(float))):
      out[int(label)].append(tuple(int(f) for f in clip))
  return out


def test_training_draws_only_stored_frames_of_each_segment(shards):
  draws = _train_draws(shards[M], seed=0)
  for vid, n in enumerate(LENGTHS):
    allowed = _candidates(n, M)
    seen = [set(clip[t] for clip in draws[vid]) for t in range(T)]
    assert seen == allowed, (vid, seen, allowed)        # inside the segment, and every candidate drawn
  other = _train_draws(shards[M], seed=1, batches=1)
  assert any(draws[v][:len(other[v])] != other[v] for v in other)


def test_fewer_stored_frames_than_clip_frames_repeat_the_nearest(tmp_path, shards):
  # M = 3 < T: segments 1 and 2 of video 0 (30 frames: stored 5, 15, 25) share frame 15.
  few = str(tmp_path / "m3")
  root = os.path.dirname(shards[0])
  make_shards.make_shards(os.path.join(root, "all.csv"), few, 1, video_root=root, short_side=None,
                          frames_per_video=3, workers=1, progress=False)
  draws = _train_draws(few, seed=0, batches=1)
  assert set(draws[0]) == {tuple(min(c) for c in _candidates(30, 3))} == {(5, 15, 15, 25)}


@pytest.mark.parametrize("clips", [1, 2])
def test_test_sampling_picks_the_nearest_stored_frame_to_the_official_point(shards, clips):
  for m in (M, 0):    # M = 0: the official rule on every frame, as before
    ev = ip.create_eval_iterator(_cfg(shards[m]), batch_size=4, num_frames=T, image_size=16,
                                 num_clips=clips, num_crops=1)
    batch = next(iter(ev))
    for label, views, keep in zip(batch["label"], batch["video"], batch["mask"]):
      if keep:
        np.testing.assert_array_equal(numbered_videos.frame_number(views.astype(float)),
                                      _test_frames(LENGTHS[label], m, clips))


def test_full_shards_train_as_before(shards):
  # Records without the new features: the official train rule, avg = n // T, t avg + randint(avg).
  draws = _train_draws(shards[0], seed=0, batches=2)
  for vid, n in enumerate(LENGTHS):
    avg = n // T
    for clip in draws[vid]:
      assert all(t * avg <= f < (t + 1) * avg for t, f in enumerate(clip)), (vid, clip)


def test_dense_sampling_is_refused_with_one_line(shards, tmp_path):
  with pytest.raises(sampling.SamplingError) as e:
    ip.create_train_iterator(_cfg(shards[M], sampling="dense"), batch_size=2, seed=0, num_frames=T,
                             image_size=16)
  message = str(e.value)
  assert "\n" not in message and "data.sampling" in message and "frames_per_video=12" in message
  assert isinstance(e.value, ValueError)        # the CLI's user-error family: one line, exit status 2
  with pytest.raises(sampling.SamplingError, match="data.sampling"):
    ip.create_eval_iterator(_cfg(shards[M], sampling="dense"), batch_size=2, num_frames=T, image_size=16,
                            num_clips=1, num_crops=1)
  # Without dataset_info.json the records say it.
  bare = tmp_path / "bare"
  bare.mkdir()
  for f in tf.io.gfile.glob(os.path.join(shards[M], "*.tfrecord")):
    shutil.copy(f, bare)
  with pytest.raises(sampling.SamplingError, match="keeps .* of its .* frames"):
    ip.create_train_iterator(_cfg(str(bare), sampling="dense"), batch_size=2, seed=0, num_frames=T,
                             image_size=16)
  next(ip.create_train_iterator(_cfg(shards[0], sampling="dense"), batch_size=2, seed=0, num_frames=T,
                                image_size=16))
