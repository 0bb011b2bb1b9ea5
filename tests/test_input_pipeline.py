"""The tf.data pipelines on shards of numbered videos (written by the real writer).

Frame f of video v has R = 8f + 4, G = 16v + 8 and a left-to-right B ramp
(tests/numbered_videos.py), so every output pixel says where it came from. Expected
frame indices come from a NumPy float64 transcription of the official
sampler (below), not from our TF code.
"""
import math

import numpy as np
import pytest
import tensorflow as tf

import numbered_videos
import reference_views
from helpers import data_config
from reference_views import LUMA, MEAN, STD, normalised
from vfocal_jax.data import make_shards
from vfocal_jax import input_pipeline as ip
from vfocal_jax.input_pipeline import sampling, sources

LENGTHS = [12, 5, 20, 3, 9, 1, 16, 7, 30, 10]   # includes videos shorter than the clip
T, S = 4, 32                                      # frames per clip, crop size


# --- Reference: the official sampler, in NumPy. -------------------------------


def ref_train_ranges(n, num_frames, interval):
  """For each output frame, the set of indices the official train sampler may pick."""
  ori = interval
  avg = (n - ori + 1) // num_frames
  if avg > 0:
    return [set(range(t * avg, t * avg + avg)) for t in range(num_frames)]
  if n > max(num_frames, ori):
    return [set(range(n - ori + 1)) for _ in range(num_frames)]
  if avg == 0:
    ratio = (n - ori + 1.0) / num_frames
    return [{int(np.around(t * ratio)) % n} for t in range(num_frames)]
  return [{0} for _ in range(num_frames)]


def ref_test_indices(n, num_frames, interval, num_clips=1):
  """Clip k at fraction (k + 0.5) / K of every segment; K = 1 is the official test rule."""
  avg = (n - interval + 1) / float(num_frames)
  out = []
  for k in range(num_clips):
    if n > interval - 1:
      offs = (np.arange(num_frames) * avg + avg * (k + 0.5) / num_clips).astype(np.int64)
    else:
      offs = np.zeros(num_frames, np.int64)
    out.append(np.mod(offs, n))
  return np.stack(out)


# --- Fixtures. ------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  """10 numbered videos (32x48) in 3 shards; label of video v is v % 4."""
  root = tmp_path_factory.mktemp("pipeline")
  lines = numbered_videos.write_numbered_videos(root, LENGTHS, 32, 48, label=lambda vid: vid % 4)
  (root / "all.csv").write_text("".join(lines))
  make_shards.make_shards(str(root / "all.csv"), str(root / "shards"), 3, video_root=str(root),
                          short_side=None, jpeg_quality=95, workers=1, progress=False)
  return str(root / "shards")


def plain_cfg(shard_dir, **overrides):
  """No colour/flip randomness and no resize, so pixels can be traced back."""
  return data_config(shard_dir, **{"flip_prob": 0.0, "color_jitter_prob": 0.0, "grayscale_prob": 0.0,
                                   "train_resize_ratio": 1.0, "eval_resize_ratio": 1.0, "shuffle_buffer_size": 16,
                                   "log_skipped": True, **overrides})


def unnormalise(video):
  return video.astype(np.float64) * STD + MEAN


def pixels(batch):
  """Pixels 0..255 of a batch, through its normalisation and back with the DESIGN constants."""
  return unnormalise(normalised(batch))


# --- Sampling. ------------------------------------------------------------------


@pytest.mark.parametrize("interval", [1, 4])
def test_segment_sampling_matches_official_formula(interval):
  for n in range(1, 41):
    ranges = ref_train_ranges(n, 8, interval)
    for s in range(6):
      idx = sampling.segment_train_indices(tf.constant(n), 8, interval, tf.constant([s, n], tf.int64))
      idx = idx.numpy()
      assert all(int(i) in r for i, r in zip(idx, ranges)), (n, idx, ranges)
      if n > max(8, interval) and (n - interval + 1) // 8 == 0:
        assert list(idx) == sorted(idx)
    for k in (1, 4):
      got = sampling.segment_test_indices(tf.constant(n), 8, interval, k).numpy()
      np.testing.assert_array_equal(got, ref_test_indices(n, 8, interval, k))


def test_segment_test_is_segment_centre_and_train_covers_segment():
  # 16 frames, 4 segments of 4: centres 2, 6, 10, 14.
  np.testing.assert_array_equal(sampling.segment_test_indices(tf.constant(16), 4, 1).numpy()[0],
                                [2, 6, 10, 14])
  seen = np.stack([sampling.segment_train_indices(tf.constant(16), 4, 1,
                                                  tf.constant([s, 0], tf.int64)).numpy()
                   for s in range(200)])
  for t in range(4):
    assert set(seen[:, t]) == set(range(4 * t, 4 * t + 4))


def test_dense_sampling_stride_and_loop():
  for n in (3, 10, 40):
    for s in range(5):
      idx = sampling.dense_train_indices(tf.constant(n), 4, 3, tf.constant([s, 1], tf.int64)).numpy()
      start = idx[0]
      assert 0 <= start <= max(n - 10, 0)
      np.testing.assert_array_equal(idx, (start + 3 * np.arange(4)) % n)
    got = sampling.dense_test_indices(tf.constant(n), 4, 3, 2).numpy()
    avg = (n - 10 + 1) / 2
    starts = (np.arange(2) * avg + avg / 2).astype(int) if n > 9 else np.zeros(2, int)
    np.testing.assert_array_equal(got, (starts[:, None] + 3 * np.arange(4)) % n)


def test_random_clip_offsets_are_independent_train_draws():
  idx = sampling.eval_indices(tf.constant(40), 4, sampling="segment", interval=4, num_clips=3,
                              clip_offsets="random", seed=tf.constant([1, 2], tf.int64)).numpy()
  ranges = ref_train_ranges(40, 4, 1)   # the official multi-view sampler uses interval 1
  assert idx.shape == (3, 4)
  assert all(int(i) in ranges[t] for clip in idx for t, i in enumerate(clip))


# --- Training pipeline. ---------------------------------------------------------


def test_train_batches_frames_labels_and_normalisation(shards):
  cfg = plain_cfg(shards)
  it = ip.create_train_iterator(cfg, batch_size=5, seed=0, num_frames=T, image_size=S)
  assert it.num_examples == len(LENGTHS) and it.num_classes == 4
  seen = set()
  for _ in range(6):
    batch = next(it)
    assert batch["video"].shape == (5, T, S, S, 3) and batch["video"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and batch["num_skipped"] == 0
    # No jitter: every clip's affine is the plain normalisation with the DESIGN constants.
    assert batch["pixel_affine"].shape == (5, 5, 3) and batch["pixel_affine"].dtype == np.float32
    np.testing.assert_allclose(batch["pixel_affine"][:, :3], np.broadcast_to(np.diag(1 / STD), (5, 3, 3)),
                               rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(batch["pixel_affine"][:, 3], np.broadcast_to(-MEAN / STD, (5, 3)), rtol=1e-6)
    np.testing.assert_array_equal(batch["pixel_affine"][:, 4], 0)
    for clip, label in zip(pixels(batch), batch["label"]):
      vid = int(numbered_videos.video_number(clip)[0])
      seen.add(vid)
      assert label == vid % 4
      frames = numbered_videos.frame_number(clip)
      ranges = ref_train_ranges(LENGTHS[vid], T, 1)
      assert all(int(f) in r for f, r in zip(frames, ranges)), (vid, frames)
      # Normalised with the DESIGN constants: G is flat 16v + 8 everywhere.
      np.testing.assert_allclose(clip[..., 1], 16 * vid + 8, atol=3)
      # No flip: the B ramp rises to the right in every frame.
      assert np.all(np.diff(clip[:, S // 2, :, 2], axis=-1).mean(-1) > 0)
  assert seen == set(range(len(LENGTHS)))


def test_flip_on_reverses_the_ramp(shards):
  cfg = plain_cfg(shards, flip_prob=1.0)
  batch = next(ip.create_train_iterator(cfg, batch_size=4, seed=0, num_frames=T, image_size=S))
  ramp = pixels(batch)[..., S // 2, :, 2]
  assert np.all(np.diff(ramp, axis=-1).mean(-1) < 0)


def test_crop_and_flip_shared_across_frames(shards):
  cfg = plain_cfg(shards, flip_prob=0.5, rrc_area_range=(0.1, 1.0))
  batch = next(ip.create_train_iterator(cfg, batch_size=8, seed=3, num_frames=T, image_size=S))
  blue = pixels(batch)[..., 2]      # B does not depend on the frame number
  assert np.abs(blue - blue[:, :1]).max() < 6       # same window and flip in every frame
  assert np.ptp(blue[:, 0, 0, 0]) > 5               # but different across clips


def _ref_jitter(x, mean_gray, b, c, s, theta, to_gray):
  """Step by step in float64: brightness, contrast, saturation, YIQ hue rotation, grayscale."""
  w = np.array([0.299, 0.587, 0.114])
  x = x * b
  m = b * mean_gray
  x = (x - m) * c + m
  g = (x @ w)[..., None]
  x = g + (x - g) * s
  yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
  q = x @ yiq.T
  i, qq = q[..., 1].copy(), q[..., 2].copy()
  q[..., 1] = np.cos(theta) * i - np.sin(theta) * qq
  q[..., 2] = np.sin(theta) * i + np.cos(theta) * qq
  x = q @ np.linalg.inv(yiq).T
  if to_gray:
    x = np.repeat((x @ w)[..., None], 3, -1)
  return x


@pytest.mark.parametrize("to_gray", [False, True])
def test_colour_affine_matches_stepwise_reference(to_gray):
  from vfocal_jax.input_pipeline import transforms
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 255, size=(3, 5, 6, 3))
  mean_gray = (x @ LUMA).mean()
  params = dict(b=1.3, c=0.7, s=1.2, theta=0.4)
  a, k = transforms.color_affine(brightness=tf.constant(1.3), contrast=tf.constant(0.7),
                                 saturation=tf.constant(1.2), hue_angle=tf.constant(0.4),
                                 to_gray=tf.constant(to_gray))
  got = transforms.apply_affine(tf.constant(x, tf.float32), transforms.pixel_affine(a, k, MEAN, STD)).numpy()
  want = (_ref_jitter(x, mean_gray, **params, to_gray=to_gray) - MEAN) / STD
  np.testing.assert_allclose(got, want, atol=1e-3)


def test_colour_draws_are_shared_by_the_frames_and_off_means_identity():
  from vfocal_jax.input_pipeline import transforms
  for s in range(5):
    seed = tf.constant([s, 9], tf.int64)
    a, b = transforms.color_matrices(transforms.color_draws(seed), jitter_prob=1.0, brightness=0.4,
                                     contrast=0.4, saturation=0.4, hue=0.1, grayscale_prob=0.5)
    assert a.shape == (3, 3) and b.shape == ()        # one draw for the whole clip
    assert not np.allclose(a.numpy(), np.eye(3), atol=1e-3)
    a, b = transforms.color_matrices(transforms.color_draws(seed), jitter_prob=0.0, brightness=0.4,
                                     contrast=0.4, saturation=0.4, hue=0.1, grayscale_prob=0.0)
    np.testing.assert_allclose(a.numpy(), np.eye(3), atol=1e-6)
    np.testing.assert_allclose(b.numpy(), 0, atol=1e-6)


def test_colour_matrices_of_a_batch_equal_those_of_each_clip():
  from vfocal_jax.input_pipeline import transforms
  draws = tf.stack([transforms.color_draws(tf.constant([s, 3], tf.int64)) for s in range(6)])
  kw = dict(jitter_prob=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, grayscale_prob=0.3)
  a, k = transforms.color_matrices(draws, **kw)
  p = transforms.pixel_affine(a, k, MEAN, STD)
  assert a.shape == (6, 3, 3) and k.shape == (6,) and p.shape == (6, 5, 3)
  for i in range(6):
    ai, ki = transforms.color_matrices(draws[i], **kw)
    np.testing.assert_allclose(a[i].numpy(), ai.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(k[i].numpy(), ki.numpy(), rtol=1e-6)
    np.testing.assert_allclose(p[i].numpy(), transforms.pixel_affine(ai, ki, MEAN, STD).numpy(), rtol=1e-6)


def test_same_seed_same_batches_and_checkpoint_resume(shards, tmp_path):
  cfg = plain_cfg(shards, color_jitter_prob=0.8, flip_prob=0.5)
  kw = dict(batch_size=3, num_frames=T, image_size=S)
  a = ip.create_train_iterator(cfg, seed=7, **kw)
  b = ip.create_train_iterator(cfg, seed=7, **kw)
  c = ip.create_train_iterator(cfg, seed=8, **kw)
  first = [next(a) for _ in range(3)]
  for x in first:
    y = next(b)
    np.testing.assert_array_equal(x["video"], y["video"])
    np.testing.assert_array_equal(x["pixel_affine"], y["pixel_affine"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert not np.array_equal(first[0]["video"], next(c)["video"])
  a.save(str(tmp_path / "iter"))
  expected = [next(a) for _ in range(4)]         # crosses an epoch boundary
  restored = ip.create_train_iterator(cfg, seed=7, **kw)
  restored.restore(str(tmp_path / "iter"))
  for x in expected:
    y = next(restored)
    np.testing.assert_array_equal(x["video"], y["video"])
    np.testing.assert_array_equal(x["label"], y["label"])


# --- Evaluation pipeline. ---------------------------------------------------------


def test_eval_views_clips_and_crops(shards):
  cfg = plain_cfg(shards)
  ev = ip.create_eval_iterator(cfg, batch_size=4, num_frames=T, image_size=S, num_clips=2, num_crops=3)
  step = (48 - S) // 2
  crop_x = [0, 2 * step, step]                   # official ThreeCrop order: left, right, middle
  count = 0
  for batch in ev:
    assert batch["video"].shape == (4, 6, T, S, S, 3)
    assert batch["video"].dtype == np.uint8
    for views, label, real in zip(pixels(batch), batch["label"], batch["mask"]):
      if not real:
        continue
      count += 1
      vid = int(numbered_videos.video_number(views[0])[0])
      assert label == vid % 4
      expected = ref_test_indices(LENGTHS[vid], T, 1, 2)
      for v in range(6):
        clip, crop = divmod(v, 3)
        np.testing.assert_array_equal(numbered_videos.frame_number(views[v]), expected[clip])
        mean_b = views[v][..., 2].mean()            # ramp mean over columns x0 .. x0 + S - 1
        assert abs(mean_b - (40 + 4 * (crop_x[crop] + (S - 1) / 2))) < 2, (v, mean_b)
  assert count == len(LENGTHS)


@pytest.mark.parametrize("height,width", [(32, 49), (51, 32), (32, 47)])   # long - short odd: 17, 19, 15
def test_three_crops_of_an_odd_size_difference_match_the_reference(height, width):
  """The official ThreeCrop offsets 0, 2 * step, step (step = (long - short) // 2), pixel for pixel."""
  frames = np.random.default_rng(width).integers(0, 256, (9, height, width, 3)).astype(np.uint8)
  cfg = plain_cfg("unused")
  views, affine = ip.eval_views_from_frames(frames, num_frames=T, image_size=S, num_clips=2, num_crops=3,
                                            data_cfg=cfg)
  expected = reference_views.eval_views(frames, num_frames=T, size=S, clips=2, crops=3,
                                        interval=int(cfg.frame_interval), normalise=False)
  np.testing.assert_array_equal(views, expected)
  np.testing.assert_allclose(affine[:3], np.diag(1 / reference_views.STD), rtol=1e-6)
  np.testing.assert_allclose(affine[3], -reference_views.MEAN / reference_views.STD, rtol=1e-6)


def test_eval_single_centre_crop_after_resize(shards):
  cfg = plain_cfg(shards, eval_resize_ratio=256 / 224)
  ev = ip.create_eval_iterator(cfg, batch_size=16, num_frames=T, image_size=S, num_clips=1, num_crops=1)
  batch = next(iter(ev))
  views = pixels(batch)[batch["mask"]]
  assert views.shape[1:] == (1, T, S, S, 3)
  # Short side 32 -> int(256/224*32) = 36, width 48 -> 54; the centre crop starts at x = 11 of the
  # resized frame, i.e. x = 11 * 48 / 54 - ... of the ramp; its mean B equals the resized ramp mean.
  xs = (np.arange(54) + 0.5) * 48 / 54 - 0.5
  resized_ramp = 40 + 4 * np.clip(xs, 0, 47)
  np.testing.assert_allclose(views[..., 2].mean(axis=(1, 2, 3, 4)), resized_ramp[11:11 + S].mean(), atol=2)


@pytest.mark.parametrize("batch_size", [3, 5])
@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_every_eval_video_counted_once_on_all_hosts(shards, batch_size, process_count):
  cfg = plain_cfg(shards)
  ids, batches = [], []
  for p in range(process_count):
    ev = ip.create_eval_iterator(cfg, batch_size=batch_size, num_frames=2, image_size=S, num_clips=1,
                                 num_crops=1, process_index=p, process_count=process_count)
    n = 0
    for batch in ev:
      n += 1
      real = pixels(batch)[batch["mask"]]
      ids += list(numbered_videos.video_number(real[:, 0, 0]))
    batches.append(n)
    assert n == len(ev) == ev.num_batches
  assert sorted(ids) == list(range(len(LENGTHS)))
  assert len(set(batches)) == 1
  per_host_max = max(len(range(p, len(LENGTHS), process_count)) for p in range(process_count))
  assert batches[0] >= math.ceil(per_host_max / batch_size)


def test_host_splits_are_disjoint_and_complete():
  shard_set = sources.ShardSet(tuple(f"f{i}" for i in range(5)), (3, 1, 4, 1, 5), 2, None)
  for count in (1, 2, 3, 5):
    parts = [sources.split_for_host(shard_set, p, count) for p in range(count)]
    files = [f for part in parts for f in part.files]
    assert sorted(files) == list(shard_set.files) and len(files) == 5
  parts = [sources.split_for_host(shard_set, p, 8) for p in range(8)]   # fewer files than hosts
  assert all(part.files == shard_set.files and part.record_shards == 8 for part in parts)
  assert sum(sum(part.counts) for part in parts) == 14


def test_eval_views_from_frames_matches_the_pipeline(shards):
  cfg = plain_cfg(shards)
  frames = numbered_videos.numbered_frames(2, LENGTHS[2], 32, 48)
  views, affine = ip.eval_views_from_frames(frames, num_frames=T, image_size=S, num_clips=2, num_crops=3,
                                            data_cfg=cfg)
  assert views.shape == (6, T, S, S, 3) and views.dtype == np.uint8 and affine.shape == (5, 3)
  ev = ip.create_eval_iterator(cfg, batch_size=16, num_frames=T, image_size=S, num_clips=2, num_crops=3)
  batch = next(iter(ev))
  row = [i for i, v in enumerate(batch["video"]) if batch["mask"][i]
         and numbered_videos.video_number(v[0].astype(np.float64))[0] == 2][0]
  # Same transform and normalisation; the pipeline's frames went through JPEG, these did not.
  np.testing.assert_allclose(views.astype(np.float64), batch["video"][row].astype(np.float64), atol=4)
  np.testing.assert_allclose(affine, batch["pixel_affine"][row], rtol=1e-6)


def test_shard_specs_directory_glob_list_and_label_map(shards, tmp_path, monkeypatch):
  """A directory, a glob and a comma list name the same files; dataset_info.json and labels.txt are read."""
  import os
  files = sources.list_shards(shards)
  assert len(files) == 3 and all(f.endswith(".tfrecord") for f in files)   # not the <shard>.json beside them
  assert sources.list_shards(shards + "/shard-*") == files
  assert sources.list_shards(f"{files[0]}, {shards}/shard-0000[12]*") == files
  monkeypatch.setenv("HOME", os.path.dirname(shards))
  assert sources.list_shards("~/" + os.path.basename(shards)) == files
  with pytest.raises(FileNotFoundError, match="nothing-here"):
    sources.list_shards(shards + "/nothing-here*")
  shard_set = sources.load_shard_set(shards)
  assert shard_set.num_examples == len(LENGTHS) and shard_set.num_classes == 4
  names = tmp_path / "names.txt"
  names.write_text("a\nb\nc\nd\ne\n")
  cfg = plain_cfg(shards, label_map=str(names))
  info = ip.get_dataset_info(cfg, "eval")
  assert info.label_names == tuple("abcde") and info.num_classes == 5 and info.num_examples == len(LENGTHS)
  with pytest.raises(FileNotFoundError, match="Label map"):
    sources.load_shard_set(shards, str(tmp_path / "missing.txt"))
