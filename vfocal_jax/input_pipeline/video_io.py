"""Reading video files (local or ``gs://``) into frames with PyAV (FFmpeg)."""
from __future__ import annotations

import contextlib
import math
import os

import numpy as np
from etils import epath

from vfocal_jax import errors

# FFmpeg demuxers / decoders that turn files which are not videos into "frames":
# a text file opens as an ANSI-art video (tty demuxer, ansi codec).
NOT_VIDEO_FORMATS = frozenset({"tty"})
NOT_VIDEO_CODECS = frozenset({"ansi"})


class VideoDecodeError(errors.UserError, ValueError):
  """A video file could not be opened or held no decodable frame."""


def _short_side_size(height: int, width: int, short_side: int) -> tuple[int, int]:
  """(height, width) scaled so that min(height, width) == short_side.

  The rounding of `transforms.short_side_size` (mmcv's: floor(x * scale + 0.5)),
  so frames resized here and clips resized in the pipeline agree.
  """
  scale = short_side / min(height, width)
  return max(1, math.floor(height * scale + 0.5)), max(1, math.floor(width * scale + 0.5))


def decode_video_file(path: str | os.PathLike, *, short_side: int | None = None,
                      max_fps: float | None = None, max_frames: int | None = None) -> np.ndarray:
  """Decodes every frame of a video file (first video stream) into RGB.

  Args:
    path: a local path or a ``gs://`` URL; any container/codec FFmpeg reads
      (mp4/h264, webm/vp9, avi/mjpeg...).
    short_side: if set, frames are resized (FFmpeg swscale, bicubic) so that
      their shorter side has this many pixels, keeping the aspect ratio.
    max_fps: if set and the video is faster, frames are dropped (by their
      timestamps) so that at most this many frames per second are kept.
    max_frames: stop after this many kept frames.

  Returns:
    uint8 array (N, H, W, 3), N >= 1, in display order.

  Raises:
    VideoDecodeError: the file is missing, unreadable, not a video (text,
      audio only), or has no decodable video frame.
  """
  import av  # PyAV; imported here so that reading shards does not need it.

  path = os.fspath(path)
  file = epath.Path(path)
  if not file.is_file():
    raise VideoDecodeError(f"{path}: no such file")
  frames = []
  try:
    # Local files by name (FFmpeg then also probes the extension: a .txt opens as text, refused below).
    with (contextlib.nullcontext(path) if "://" not in path else file.open("rb")) as source, \
        av.open(source) as container:
      if container.format.name in NOT_VIDEO_FORMATS or not container.streams.video:
        raise VideoDecodeError(f"{path}: not a video (no video stream; FFmpeg reads it as "
                               f"{container.format.name!r})")
      stream = container.streams.video[0]
      if stream.codec_context.name in NOT_VIDEO_CODECS:
        raise VideoDecodeError(f"{path}: not a video (FFmpeg reads it as {stream.codec_context.name!r} text)")
      stream.thread_type = "AUTO"
      next_time = None
      size = None
      for frame in container.decode(stream):
        if max_fps:
          t = float(frame.time) if frame.time is not None else None
          if t is not None:
            if next_time is not None and t < next_time - 1e-6:
              continue
            next_time = (t if next_time is None else next_time) + 1.0 / max_fps
        if size is None:
          size = ((frame.height, frame.width) if short_side is None
                  else _short_side_size(frame.height, frame.width, short_side))
        frames.append(frame.to_ndarray(format="rgb24", height=size[0], width=size[1]))
        if max_frames and len(frames) >= max_frames:
          break
  except VideoDecodeError:
    raise
  except Exception as e:  # PyAV raises many FFmpeg error types (InvalidDataError, ...).
    if not frames:
      raise VideoDecodeError(f"{path}: not a video FFmpeg can read ({type(e).__name__}: {e})") from e
    # A stream damaged near its end: keep the frames decoded so far.
  if not frames:
    raise VideoDecodeError(f"{path}: no decodable video frame")
  return np.stack(frames)
