"""Spatial transforms of a clip: one set of random parameters for all its frames.

Clips leave the pipeline as uint8 pixels with a per-clip colour map
(`pixel_affine`: colour jitter and normalisation in one (5, 3) matrix) that
the device applies (`vfocal_jax.pixels`): a quarter of the bytes of float32
clips to batch and transfer, and no full-size float passes on the host.
Geometry follows the official (mmaction) pipeline: resize the short side with
round-half-up sizes, RandomResizedCrop with 10 attempts and a centred square
fallback, centre crop at ((H - S) // 2, (W - S) // 2), and ThreeCrop at
offsets 0, 2 * step, step along the long side (step = (L - S) // 2; official
order left, right, middle).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from vfocal_jax import errors
from vfocal_jax.colour import LUMA


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


def resize_uint8(video: tf.Tensor, size: tuple) -> tf.Tensor:
  """`resize` rounded to uint8 (half up), as image libraries resize uint8 frames."""
  return tf.cast(resize(video, size) + 0.5, tf.uint8)   # bilinear stays inside 0..255


def flip(video: tf.Tensor, prob: float, seed: tf.Tensor) -> tf.Tensor:
  """Horizontal flip of every frame with probability `prob` (only computed when taken)."""
  if prob <= 0:
    return video
  coin = tf.random.stateless_uniform([], seed) < prob
  return tf.cond(coin, lambda: tf.reverse(video, axis=[-2]), lambda: video)


# --- Colour: one affine map per clip, fused with the normalisation. ------------
#
# Brightness, contrast, saturation, hue and grayscale are all (nearly) linear in
# RGB, so the whole chain is one 3x3 matrix plus offsets; with the
# normalisation folded in, a clip costs one multiply-add per pixel instead of a
# dozen full-size element-wise passes. The map is built here, per batch, and
# applied on the device (`vfocal_jax.pixels.normalize`), which also computes
# the clip's mean luma m that the contrast step blends towards: a pixel x maps
# to [x, 1, m] @ pixel_affine, a (5, 3) matrix.
# Differences from torchvision's ColorJitter: the factors are shared by all
# frames, the order is fixed (brightness, contrast, saturation, hue), hue is a
# rotation of the chroma plane in YIQ (instead of an HSV shift), pixels are not
# clamped to 0..255 between steps, and contrast blends towards the mean luma
# of the whole clip rather than of each frame.

_YIQ = np.array([LUMA, [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_GRAY_ROW = np.array(LUMA)


def _constant(x) -> tf.Tensor:
  return tf.constant(np.asarray(x, np.float32))


def color_affine(*, brightness: tf.Tensor, contrast: tf.Tensor, saturation: tf.Tensor, hue_angle: tf.Tensor,
                 to_gray: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """The colour map of given jitter factors: out = A x + k m (1, 1, 1), m the clip's mean luma.

  Args (all of the same shape (...,): one value per clip, or scalars):
    brightness, contrast, saturation: factors (1 = unchanged).
    hue_angle: rotation of the YIQ chroma plane, radians.
    to_gray: bool, replace the result by its luma.
  Returns:
    A (..., 3, 3) and k (...,), float32.
  """
  gray = _constant(np.outer(np.ones(3), _GRAY_ROW))          # x -> luma in every channel
  yiq, yiq_inv = _constant(_YIQ), _constant(np.linalg.inv(_YIQ))
  cos, sin = tf.cos(hue_angle), tf.sin(hue_angle)
  zero, one = tf.zeros_like(cos), tf.ones_like(cos)
  rot = tf.stack([tf.stack([one, zero, zero], -1), tf.stack([zero, cos, -sin], -1),
                  tf.stack([zero, sin, cos], -1)], -2)
  sat = saturation[..., None, None]
  sat_m = sat * tf.eye(3) + (1.0 - sat) * gray
  a = yiq_inv @ rot @ yiq @ sat_m * (contrast * brightness)[..., None, None]
  a = tf.where(to_gray[..., None, None], gray @ a, a)
  # Contrast blends with the mean luma after brightness: (1 - c) b m on every
  # channel. Gray vectors are fixed points of the saturation, hue and
  # grayscale maps, so that offset passes through them unchanged.
  return a, (1.0 - contrast) * brightness


def color_draws(seed: tf.Tensor) -> tf.Tensor:
  """The (6,) uniform draws of one clip's colour augmentation (`color_matrices` turns them into a map)."""
  return tf.random.stateless_uniform([6], seed, 0.0, 1.0)


def color_matrices(draws: tf.Tensor, *, jitter_prob: float, brightness: float, contrast: float,
                   saturation: float, hue: float, grayscale_prob: float) -> tuple[tf.Tensor, tf.Tensor]:
  """Random jitter (probability `jitter_prob`) then grayscale (`grayscale_prob`), one draw per clip.

  Factors as torchvision: brightness/contrast/saturation in [1 - x, 1 + x],
  hue shift in [-hue, hue] of a full turn. `draws` (..., 6) from
  `color_draws`. Returns `color_affine`'s A (..., 3, 3) and k (...,).
  Vectorised over clips: run once per batch, since a few dozen tiny ops per
  clip cost more than the whole batch's worth of arithmetic.
  """
  u = [draws[..., i] for i in range(6)]
  jitter = u[4] < jitter_prob

  def factor(x, amount):
    return tf.where(jitter, 1.0 + amount * (2.0 * x - 1.0), 1.0)

  return color_affine(brightness=factor(u[0], brightness), contrast=factor(u[1], contrast),
                      saturation=factor(u[2], saturation),
                      hue_angle=tf.where(jitter, (2.0 * u[3] - 1.0) * hue * 2.0 * math.pi, 0.0),
                      to_gray=u[5] < grayscale_prob)


def pixel_affine(a: tf.Tensor, k: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """(..., 5, 3) float32 P with [x, 1, m] @ P = ((A x + k m) - mean) / std (see `vfocal_jax.pixels`)."""
  inv_std = 1.0 / _constant(std)
  w = tf.linalg.matrix_transpose(a) * inv_std
  offset = tf.broadcast_to(-_constant(mean) * inv_std, tf.shape(w[..., 0, :]))
  luma = tf.cast(k, tf.float32)[..., None] * inv_std
  return tf.stack([w[..., 0, :], w[..., 1, :], w[..., 2, :], offset, luma], axis=-2)


def normalization_affine(mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """`pixel_affine` of the plain normalisation (x - mean) / std."""
  return pixel_affine(tf.eye(3), tf.constant(0.0), mean, std)


def apply_affine(video: tf.Tensor, affine: tf.Tensor) -> tf.Tensor:
  """[x, 1, m] @ affine for every pixel of one clip's (..., 3) frames, float32; m = mean luma of
  `video` (the host-side twin of `vfocal_jax.pixels.normalize`)."""
  x = tf.reshape(tf.cast(video, tf.float32), [-1, 3])
  luma = tf.reduce_mean(tf.linalg.matvec(x, _constant(_GRAY_ROW)))
  out = tf.matmul(x, affine[:3]) + affine[3] + luma * affine[4]
  return tf.reshape(out, tf.shape(video))


def eval_crop_offsets(height: tf.Tensor, width: tf.Tensor, crop: int, num_crops: int) -> tf.Tensor:
  """(num_crops, 2) int32 (y, x) crop corners: centre, or the official three crops."""
  cy, cx = (height - crop) // 2, (width - crop) // 2
  if num_crops == 1:
    return tf.stack([cy, cx])[None]
  if num_crops != 3:
    raise errors.ConfigError(f"num_crops={num_crops}: expected 1 or 3 (test_num_crops / eval_num_crops)")
  wide = width >= height
  step = tf.where(wide, width - crop, height - crop) // 2
  along = tf.stack([tf.zeros_like(step), 2 * step, step])
  ys = tf.where(wide, tf.fill([3], cy), along)
  xs = tf.where(wide, along, tf.fill([3], cx))
  return tf.stack([ys, xs], axis=1)


def eval_views(frames: tf.Tensor, *, num_clips: int, num_frames: int, image_size: int, num_crops: int,
               resize_ratio: float) -> tf.Tensor:
  """Test views of already sampled frames.

  Args:
    frames: (num_clips * num_frames, H, W, 3) uint8/float, clip-major.
  Returns:
    uint8 (num_clips * num_crops, num_frames, S, S, 3) pixels (normalise with
    `normalization_affine`); view v = clip * num_crops + crop.
  """
  shape = tf.shape(frames)
  short = image_size if num_crops == 3 else int(resize_ratio * image_size)
  h, w = short_side_size(shape[1], shape[2], short)
  resized = resize_uint8(frames, (h, w))
  offsets = eval_crop_offsets(h, w, image_size, num_crops)
  views = tf.stack([  # view v = clip * num_crops + crop, one copy
      resized[k * num_frames:(k + 1) * num_frames, offsets[i, 0]:offsets[i, 0] + image_size,
              offsets[i, 1]:offsets[i, 1] + image_size]
      for k in range(num_clips) for i in range(num_crops)])
  return views
