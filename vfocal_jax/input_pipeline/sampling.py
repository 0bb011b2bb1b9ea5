"""Which frames of a video make a clip: official segment sampling and dense sampling.

All functions are TF graph functions of the video length `n` (a scalar
tensor) and return int32 indices in [0, n). Randomness is stateless (an
explicit seed of shape [2]) so that a pipeline with a fixed seed yields the
same clips after a restart.

Segment sampling follows the official Video-FocalNets sampler (mmaction's
`SampleFrames` with clip_len=1, num_clips=T, frame_interval=`interval`):

* train: `avg = (n - interval + 1) // T`; if avg > 0 the t-th index is
  `t * avg + randint(avg)`; else if n > max(T, interval), T sorted random
  draws from [0, n - interval]; else if avg == 0, `round(t * (n - interval +
  1) / T)`; else 0.
* test: `avg = (n - interval + 1) / T` (float), index `int(t * avg + avg / 2)`
  (the segment centre), or 0 when n < interval.
* short videos loop: indices are taken modulo n.
"""
from __future__ import annotations

import tensorflow as tf


def _fold(seed: tf.Tensor, k: int) -> tf.Tensor:
  return tf.random.experimental.stateless_fold_in(seed, k)


def segment_train_indices(n: tf.Tensor, num_frames: int, interval: int, seed: tf.Tensor) -> tf.Tensor:
  """Official training segment sampling (one random frame per segment)."""
  n = tf.cast(n, tf.int32)
  t = tf.range(num_frames, dtype=tf.int32)
  span = n - interval + 1
  avg = tf.math.floordiv(span, num_frames)
  jitter = tf.random.stateless_uniform([num_frames], _fold(seed, 0), 0, tf.maximum(avg, 1), tf.int32)
  in_segments = t * avg + jitter
  draws = tf.random.stateless_uniform([num_frames], _fold(seed, 1), 0, tf.maximum(span, 1), tf.int32)
  sorted_draws = tf.sort(draws)
  ratio = tf.cast(span, tf.float64) / num_frames
  spread = tf.cast(tf.round(tf.cast(t, tf.float64) * ratio), tf.int32)
  offsets = tf.where(avg > 0, in_segments,
                     tf.where(n > max(num_frames, interval), sorted_draws,
                              tf.where(tf.equal(avg, 0), spread, tf.zeros_like(t))))
  return tf.math.floormod(offsets, tf.maximum(n, 1))


def segment_test_indices(n: tf.Tensor, num_frames: int, interval: int, num_clips: int = 1) -> tf.Tensor:
  """Deterministic segment sampling, (num_clips, num_frames).

  Clip k takes, in every segment, the point at fraction (k + 0.5) / num_clips
  of it; num_clips=1 is the official test sampler (segment centres).
  """
  n = tf.cast(n, tf.int32)
  avg = tf.cast(n - interval + 1, tf.float64) / num_frames
  t = tf.cast(tf.range(num_frames), tf.float64)[None, :]
  k = tf.cast(tf.range(num_clips), tf.float64)[:, None]
  offsets = tf.cast(t * avg + avg * (k + 0.5) / num_clips, tf.int32)
  offsets = tf.where(n > interval - 1, offsets, tf.zeros_like(offsets))
  return tf.math.floormod(offsets, tf.maximum(n, 1))


def dense_train_indices(n: tf.Tensor, num_frames: int, interval: int, seed: tf.Tensor) -> tf.Tensor:
  """num_frames frames `interval` apart from a random start (looping short videos)."""
  n = tf.cast(n, tf.int32)
  span = (num_frames - 1) * interval + 1
  start = tf.random.stateless_uniform([], seed, 0, tf.maximum(n - span, 0) + 1, tf.int32)
  return tf.math.floormod(start + tf.range(num_frames) * interval, tf.maximum(n, 1))


def dense_test_indices(n: tf.Tensor, num_frames: int, interval: int, num_clips: int = 1) -> tf.Tensor:
  """Dense clips with evenly spaced starts (mmaction test rule), (num_clips, num_frames)."""
  n = tf.cast(n, tf.int32)
  span = (num_frames - 1) * interval + 1
  avg = tf.cast(n - span + 1, tf.float64) / num_clips
  k = tf.cast(tf.range(num_clips), tf.float64)
  starts = tf.cast(k * avg + avg / 2, tf.int32)
  starts = tf.where(n > span - 1, starts, tf.zeros_like(starts))
  idx = starts[:, None] + tf.range(num_frames)[None, :] * interval
  return tf.math.floormod(idx, tf.maximum(n, 1))


def train_indices(n: tf.Tensor, num_frames: int, *, sampling: str, interval: int,
                  seed: tf.Tensor) -> tf.Tensor:
  """Training clip indices, (num_frames,)."""
  if sampling == "segment":
    return segment_train_indices(n, num_frames, interval, seed)
  if sampling == "dense":
    return dense_train_indices(n, num_frames, interval, seed)
  raise ValueError(f"Unknown sampling {sampling!r}; expected 'segment' or 'dense'.")


def eval_indices(n: tf.Tensor, num_frames: int, *, sampling: str, interval: int, num_clips: int,
                 clip_offsets: str = "uniform", seed: tf.Tensor | None = None) -> tf.Tensor:
  """Test clip indices, (num_clips, num_frames).

  clip_offsets='uniform' is deterministic. 'random' reproduces the official
  multi-clip test: each clip is an independent training draw, with interval 1
  for segment sampling (the official code hard-codes it for multi-view).
  With one clip, 'random' still uses the deterministic test rule (as the
  official code does).
  """
  if clip_offsets == "random" and num_clips > 1:
    if seed is None:
      raise ValueError("clip_offsets='random' needs a seed.")
    interval = 1 if sampling == "segment" else interval
    return tf.stack([train_indices(n, num_frames, sampling=sampling, interval=interval,
                                   seed=_fold(seed, 100 + k)) for k in range(num_clips)])
  if clip_offsets not in ("uniform", "random"):
    raise ValueError(f"Unknown clip_offsets {clip_offsets!r}; expected 'uniform' or 'random'.")
  if sampling == "segment":
    return segment_test_indices(n, num_frames, interval, num_clips)
  if sampling == "dense":
    return dense_test_indices(n, num_frames, interval, num_clips)
  raise ValueError(f"Unknown sampling {sampling!r}; expected 'segment' or 'dense'.")
