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

Records that keep only some frames (`make_shards --frames_per_video=M`:
frames at the centres of M equal segments, with their indices in the video,
`frame_index`, and its length `n`) are sampled on the video's own timeline:

* train: segment t is [t * span / T, (t + 1) * span / T) of the video's
  frames, span = n - interval + 1; one of the stored frames inside it is
  drawn uniformly (M = k T stores k per segment); a segment with none (M <
  T, or a video shorter than T) takes the stored frame nearest its centre.
* test: the frame the test rule above picks on the whole video (the centre,
  or clip k's point), replaced by the nearest stored frame (ties: the earlier).
* dense sampling needs consecutive frames: the pipeline refuses such shards
  before building the dataset (`check_sampling`).

Records without `frame_index` (every frame stored) use the rules above as they are.
"""
from __future__ import annotations

import tensorflow as tf

from vfocal_jax import errors


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


class SamplingError(errors.UserError, ValueError):
  """The sampling config does not fit the shards (a user error: one line naming the field)."""


def check_sampling(sampling: str, frames_per_video: int, where: str) -> None:
  """Refuses dense sampling on shards that keep M > 0 frames per video (`where` names them)."""
  if sampling == "dense" and frames_per_video > 0:
    raise SamplingError(
        f"data.sampling='dense' needs consecutive frames, but the shards keep only {frames_per_video} "
        f"frames per video, at segment centres ({where}): set data.sampling='segment', or write the "
        f"shards again with make_shards --frames_per_video=0.")


def nearest_stored(frame_index: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
  """Positions in `frame_index` (increasing) of the stored frame nearest each target
  frame (ties: the earlier), int32 of the shape of `targets`."""
  frame_index = tf.cast(frame_index, tf.int32)
  flat = tf.reshape(tf.cast(targets, tf.int32), [-1])
  last = tf.size(frame_index) - 1
  after = tf.searchsorted(frame_index, flat, side="left", out_type=tf.int32)  # first >= target
  lo, hi = tf.maximum(after - 1, 0), tf.minimum(after, last)
  d_lo = tf.abs(flat - tf.gather(frame_index, lo))
  d_hi = tf.abs(tf.gather(frame_index, hi) - flat)
  return tf.reshape(tf.where(d_hi < d_lo, hi, lo), tf.shape(targets))


def stored_segment_train_positions(frame_index: tf.Tensor, n: tf.Tensor, num_frames: int, interval: int,
                                   seed: tf.Tensor) -> tf.Tensor:
  """Training segment sampling among stored frames (module docstring), (num_frames,) positions."""
  frame_index = tf.cast(frame_index, tf.int32)
  n = tf.cast(n, tf.int32)
  span = tf.maximum(n - interval + 1, 1)
  t = tf.range(num_frames + 1, dtype=tf.int32)
  bounds = (t * span + num_frames - 1) // num_frames       # ceil(t * span / T): first frame of segment t
  first = tf.searchsorted(frame_index, bounds, side="left", out_type=tf.int32)
  start, count = first[:-1], first[1:] - first[:-1]        # stored frames inside each segment
  u = tf.random.stateless_uniform([num_frames], seed, dtype=tf.float32)
  pick = start + tf.minimum(tf.cast(tf.floor(u * tf.cast(count, tf.float32)), tf.int32),
                            tf.maximum(count - 1, 0))
  centre = nearest_stored(frame_index, segment_test_indices(n, num_frames, interval)[0])
  return tf.where(count > 0, pick, centre)


def _video_length(frame_index: tf.Tensor, num_video_frames: tf.Tensor) -> tf.Tensor:
  """The video's frame count; the last stored index + 1 when the record does not say."""
  last = tf.cast(tf.reduce_max(frame_index), tf.int32) + 1
  return tf.where(num_video_frames > 0, tf.cast(num_video_frames, tf.int32), last)


def train_positions(num_stored: tf.Tensor, num_frames: int, *, sampling: str, interval: int, seed: tf.Tensor,
                    frame_index: tf.Tensor | None = None,
                    num_video_frames: tf.Tensor | None = None) -> tf.Tensor:
  """Which stored frames make a training clip, (num_frames,) positions in [0, num_stored).

  With `frame_index` (non-empty: a record keeping some frames) segment
  sampling works on the video's timeline; otherwise stored frame i is frame i.
  """
  every_frame = lambda: train_indices(num_stored, num_frames, sampling=sampling,  # noqa: E731
                                      interval=interval, seed=seed)
  if frame_index is None or sampling != "segment":
    return every_frame()
  some = lambda: stored_segment_train_positions(  # noqa: E731
      frame_index, _video_length(frame_index, num_video_frames), num_frames, interval, seed)
  return tf.cond(tf.size(frame_index) > 0, some, every_frame)


def eval_positions(num_stored: tf.Tensor, num_frames: int, *, sampling: str, interval: int, num_clips: int,
                   clip_offsets: str = "uniform", seed: tf.Tensor | None = None,
                   frame_index: tf.Tensor | None = None,
                   num_video_frames: tf.Tensor | None = None) -> tf.Tensor:
  """Which stored frames make the test clips, (num_clips, num_frames) positions (see `eval_indices`)."""
  every_frame = lambda: eval_indices(num_stored, num_frames, sampling=sampling, interval=interval,  # noqa: E731
                                     num_clips=num_clips, clip_offsets=clip_offsets, seed=seed)
  if frame_index is None or sampling != "segment":
    return every_frame()

  def some():
    n = _video_length(frame_index, num_video_frames)
    if clip_offsets == "random" and num_clips > 1:
      return tf.stack([stored_segment_train_positions(frame_index, n, num_frames, 1, _fold(seed, 100 + k))
                       for k in range(num_clips)])
    return nearest_stored(frame_index, eval_indices(n, num_frames, sampling=sampling, interval=interval,
                                                    num_clips=num_clips, clip_offsets=clip_offsets, seed=seed))
  return tf.cond(tf.size(frame_index) > 0, some, every_frame)


def train_indices(n: tf.Tensor, num_frames: int, *, sampling: str, interval: int,
                  seed: tf.Tensor) -> tf.Tensor:
  """Training clip indices, (num_frames,)."""
  if sampling == "segment":
    return segment_train_indices(n, num_frames, interval, seed)
  if sampling == "dense":
    return dense_train_indices(n, num_frames, interval, seed)
  raise errors.ConfigError(f"data.sampling={sampling!r}: expected 'segment' or 'dense'")


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
    raise errors.ConfigError(f"data.clip_offsets={clip_offsets!r}: expected 'uniform' or 'random'")
  if sampling == "segment":
    return segment_test_indices(n, num_frames, interval, num_clips)
  if sampling == "dense":
    return dense_test_indices(n, num_frames, interval, num_clips)
  raise errors.ConfigError(f"data.sampling={sampling!r}: expected 'segment' or 'dense'")
