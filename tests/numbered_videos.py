"""Videos whose pixels say which video and which frame they are (test support, not part of the library).

Frame f of video v (flat colours survive JPEG well):
  R = 8 * f + 4          (f < 32)
  G = 16 * v + 8         (v < 16)
  B = 40 + 4 * x         horizontal ramp (x < 48): tells crops and flips apart
"""
from __future__ import annotations

import os

import numpy as np


def numbered_frames(video_id: int, num_frames: int, height: int, width: int) -> np.ndarray:
  """uint8 (num_frames, height, width, 3) as described in the module docstring."""
  if num_frames > 32 or video_id >= 16 or width > 48:
    raise ValueError("numbered_frames supports < 32 frames, < 16 videos, width <= 48.")
  frames = np.empty((num_frames, height, width, 3), np.uint8)
  frames[..., 0] = (8 * np.arange(num_frames) + 4)[:, None, None]
  frames[..., 1] = 16 * video_id + 8
  frames[..., 2] = (40 + 4 * np.arange(width))[None, None, :]
  return frames


def write_video(path: str, frames: np.ndarray, fps: int = 10) -> None:
  """Writes frames losslessly (FFV1 in Matroska) with PyAV."""
  import av
  with av.open(path, mode="w", format="matroska") as container:
    stream = container.add_stream("ffv1", rate=fps)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "bgr0"
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def write_numbered_videos(root, lengths, height: int, width: int, label) -> list[str]:
  """Video v (``lengths[v]`` frames) as ``root``/v{v}.mkv; returns the CSV lines ``v{v}.mkv,{label(v)}\n``."""
  lines = []
  for vid, n in enumerate(lengths):
    write_video(os.path.join(root, f"v{vid}.mkv"), numbered_frames(vid, n, height, width))
    lines.append(f"v{vid}.mkv,{label(vid)}\n")
  return lines


def frame_number(pixels: np.ndarray) -> np.ndarray:
  """Frame numbers from 0..255 RGB pixels (..., H, W, 3): the rounded mean R."""
  return np.rint((pixels[..., 0].mean(axis=(-2, -1)) - 4) / 8).astype(int)


def video_number(pixels: np.ndarray) -> np.ndarray:
  """Video ids from 0..255 RGB pixels (..., H, W, 3): the rounded mean G."""
  return np.rint((pixels[..., 1].mean(axis=(-2, -1)) - 8) / 16).astype(int)
