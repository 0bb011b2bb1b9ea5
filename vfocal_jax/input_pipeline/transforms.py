"""Spatial transforms of a clip: one set of random parameters for all its frames.

Pixels stay in 0..255 float32 until `normalize`. Geometry follows the
official (mmaction) pipeline: resize the short side with round-half-up sizes,
RandomResizedCrop with 10 attempts and a centred square fallback, centre crop
at ((H - S) // 2, (W - S) // 2), and ThreeCrop at offsets 0, 2 * step, step
along the long side (step = (L - S) // 2; official order left, right, middle).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import tensorflow as tf

_GRAY = (0.299, 0.587, 0.114)


def _fold(seed: tf.Tensor, k: int) -> tf.Tensor:
  return tf.random.experimental.stateless_fold_in(seed, k)


def short_side_size(height: tf.Tensor, width: tf.Tensor, short_side: int) -> tuple[tf.Tensor, tf.Tensor]:
  """(height, width) scaled so that the short side is `short_side` (mmcv rounding)."""
  h = tf.cast(height, tf.float64)
  w = tf.cast(width, tf.float64)
  scale = short_side / tf.minimum(h, w)
  return (tf.cast(tf.floor(h * scale + 0.5), tf.int32), tf.cast(tf.floor(w * scale + 0.5), tf.int32))


def random_resized_crop_box(height: tf.Tensor, width: tf.Tensor, *, area_range: Sequence[float],
                            aspect_ratio_range: Sequence[float], seed: tf.Tensor,
                            max_attempts: int = 10) -> tf.Tensor:
  """(y, x, h, w) int32 of a random crop (mmaction RandomResizedCrop rule)."""
  height = tf.cast(height, tf.int32)
  width = tf.cast(width, tf.int32)
  area = tf.cast(height * width, tf.float64)
  log_ar = tf.random.stateless_uniform([max_attempts], _fold(seed, 0), math.log(aspect_ratio_range[0]),
                                       math.log(aspect_ratio_range[1]), tf.float64)
  ratios = tf.exp(log_ar)
  areas = tf.random.stateless_uniform([max_attempts], _fold(seed, 1), area_range[0], area_range[1],
                                      tf.float64) * area
  crop_w = tf.cast(tf.round(tf.sqrt(areas * ratios)), tf.int32)
  crop_h = tf.cast(tf.round(tf.sqrt(areas / ratios)), tf.int32)
  fits = (crop_w <= width) & (crop_h <= height) & (crop_w > 0) & (crop_h > 0)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  any_fit = tf.reduce_any(fits)
  cw = tf.where(any_fit, crop_w[first], tf.minimum(height, width))
  ch = tf.where(any_fit, crop_h[first], tf.minimum(height, width))
  u = tf.random.stateless_uniform([2], _fold(seed, 2), 0.0, 1.0, tf.float64)
  x = tf.where(any_fit, tf.cast(tf.floor(u[0] * tf.cast(width - cw + 1, tf.float64)), tf.int32),
               (width - cw) // 2)
  y = tf.where(any_fit, tf.cast(tf.floor(u[1] * tf.cast(height - ch + 1, tf.float64)), tf.int32),
               (height - ch) // 2)
  return tf.stack([y, x, ch, cw])


def resize(video: tf.Tensor, size: tuple) -> tf.Tensor:
  """Bilinear resize of (..., H, W, 3) frames to `size`, float32 0..255."""
  return tf.image.resize(tf.cast(video, tf.float32), size, method="bilinear", antialias=False)


def flip(video: tf.Tensor, prob: float, seed: tf.Tensor) -> tf.Tensor:
  """Horizontal flip of every frame with probability `prob`."""
  if prob <= 0:
    return video
  coin = tf.random.stateless_uniform([], seed) < prob
  return tf.where(coin, tf.reverse(video, axis=[-2]), video)


def _gray(video: tf.Tensor) -> tf.Tensor:
  return tf.reduce_sum(video * tf.constant(_GRAY, video.dtype), axis=-1, keepdims=True)


def color_jitter(video: tf.Tensor, *, prob: float, brightness: float, contrast: float,
                 saturation: float, hue: float, seed: tf.Tensor) -> tf.Tensor:
  """torchvision-style ColorJitter with one set of factors for the clip.

  Applied with probability `prob`, in the order brightness, contrast,
  saturation, hue (torchvision draws a random order; the official pipeline
  also draws new factors per frame, which makes motion flicker; here the
  whole clip shares them). Pixels 0..255 float, clipped after each step.
  """
  if prob <= 0:
    return video
  u = tf.random.stateless_uniform([5], seed, 0.0, 1.0)

  def factor(x, amount):
    return 1.0 + amount * (2.0 * x - 1.0) if amount > 0 else None

  out = video
  b = factor(u[0], brightness)
  if b is not None:
    out = tf.clip_by_value(out * b, 0.0, 255.0)
  c = factor(u[1], contrast)
  if c is not None:
    mean = tf.reduce_mean(_gray(out), axis=[-3, -2, -1], keepdims=True)
    out = tf.clip_by_value((out - mean) * c + mean, 0.0, 255.0)
  s = factor(u[2], saturation)
  if s is not None:
    g = _gray(out)
    out = tf.clip_by_value((out - g) * s + g, 0.0, 255.0)
  if hue > 0:
    out = tf.image.adjust_hue(out / 255.0, hue * (2.0 * u[3] - 1.0)) * 255.0
    out = tf.clip_by_value(out, 0.0, 255.0)
  return tf.where(u[4] < prob, out, video)


def grayscale(video: tf.Tensor, prob: float, seed: tf.Tensor) -> tf.Tensor:
  """Replace every frame by its luma (3 equal channels) with probability `prob`."""
  if prob <= 0:
    return video
  coin = tf.random.stateless_uniform([], seed) < prob
  return tf.where(coin, tf.broadcast_to(_gray(video), tf.shape(video)), video)


def normalize(video: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  return (tf.cast(video, tf.float32) - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def eval_crop_offsets(height: tf.Tensor, width: tf.Tensor, crop: int, num_crops: int) -> tf.Tensor:
  """(num_crops, 2) int32 (y, x) crop corners: centre, or the official three crops."""
  cy, cx = (height - crop) // 2, (width - crop) // 2
  if num_crops == 1:
    return tf.stack([cy, cx])[None]
  if num_crops != 3:
    raise ValueError(f"num_crops must be 1 or 3, got {num_crops}.")
  wide = width >= height
  step = tf.where(wide, width - crop, height - crop) // 2
  along = tf.stack([tf.zeros_like(step), 2 * step, step])
  ys = tf.where(wide, tf.fill([3], cy), along)
  xs = tf.where(wide, along, tf.fill([3], cx))
  return tf.stack([ys, xs], axis=1)


def eval_views(frames: tf.Tensor, *, num_clips: int, num_frames: int, image_size: int, num_crops: int,
               resize_ratio: float, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """Test views of already sampled frames.

  Args:
    frames: (num_clips * num_frames, H, W, 3) uint8/float, clip-major.
  Returns:
    float32 (num_clips * num_crops, num_frames, S, S, 3), normalised; view
    v = clip * num_crops + crop.
  """
  shape = tf.shape(frames)
  short = image_size if num_crops == 3 else int(resize_ratio * image_size)
  h, w = short_side_size(shape[1], shape[2], short)
  resized = resize(frames, (h, w))
  offsets = eval_crop_offsets(h, w, image_size, num_crops)
  crops = [resized[:, offsets[i, 0]:offsets[i, 0] + image_size, offsets[i, 1]:offsets[i, 1] + image_size]
           for i in range(num_crops)]
  views = tf.stack(crops, axis=1)                     # (K*T, C, S, S, 3)
  views = tf.reshape(views, [num_clips, num_frames, num_crops, image_size, image_size, 3])
  views = tf.transpose(views, [0, 2, 1, 3, 4, 5])
  views = tf.reshape(views, [num_clips * num_crops, num_frames, image_size, image_size, 3])
  return normalize(views, mean, std)
