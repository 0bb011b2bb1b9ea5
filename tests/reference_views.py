"""Independent references for tests: lossless videos with known frames, and test views cut in NumPy.

Written from the released test protocol, not from the library: segment
sampling takes, in each of T equal segments of the first n - interval + 1
frames, the point at fraction (k + 0.5) / clips (clip k); 3 crops lie along
the long side of frames whose short side is already the input size, at the
official ThreeCrop's offsets 0, 2 * step, step (left, right, middle), step =
(long - short) // 2: for an odd difference the right crop stops one pixel
short of the edge; pixels are normalised with the ImageNet mean/std.
"""
import numpy as np

from vfocal_jax.data.testing import write_video  # Lossless (FFV1): decoding gives back the frames.

MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])


def eval_views(frames: np.ndarray, *, num_frames: int, size: int, clips: int, crops: int, interval: int,
               normalise: bool = True) -> np.ndarray:
  """(clips * crops, T, size, size, 3) views of frames whose short side is ``size`` (float64 if normalised)."""
  n, h, w, _ = frames.shape
  assert min(h, w) == size, "the reference needs no resize: the short side must be the input size"
  avg = (n - interval + 1) / num_frames
  step = (max(h, w) - size) // 2
  starts = [step] if crops == 1 else [0, 2 * step, step]
  views = []
  for k in range(clips):
    clip = frames[[int(t * avg + avg * (k + 0.5) / clips) % n for t in range(num_frames)]]
    for s in starts:
      views.append(clip[:, :, s:s + size] if w >= h else clip[:, s:s + size])
  views = np.stack(views)
  return (views.astype(np.float64) - MEAN) / STD if normalise else views
