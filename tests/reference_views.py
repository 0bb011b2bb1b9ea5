"""Independent references for tests: lossless videos with known frames, test views cut in NumPy, the model input.

Written from the released test protocol, not from the library: segment
sampling takes, in each of T equal segments of the first n - interval + 1
frames, the point at fraction (k + 0.5) / clips (clip k); 3 crops lie along
the long side of frames whose short side is already the input size, at the
official ThreeCrop's offsets 0, 2 * step, step (left, right, middle), step =
(long - short) // 2: for an odd difference the right crop stops one pixel
short of the edge; pixels are normalised with the ImageNet mean/std. A
training batch's clips become the model input through their colour map,
``[r, g, b, 1, mean luma] @ pixel_affine`` (docs/data.md), computed here in
float64.
"""
import numpy as np

from numbered_videos import write_video  # noqa: F401  Re-exported. Lossless (FFV1): decoding gives back the frames.

MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])
LUMA = np.array([0.299, 0.587, 0.114])  # Rec. 601: the luma weights of the pipeline's colour map (docs/data.md).


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


def normalised(batch) -> np.ndarray:
  """The model input of a batch, float64: ``[r, g, b, 1, mean luma] @ pixel_affine`` of each example.

  ``batch["video"]``: (B, ..., 3) pixels (clips, or an eval batch's views); ``batch["pixel_affine"]``: (B, 5, 3);
  the mean luma is over all of an example's pixels.
  """
  x = batch["video"].astype(np.float64)
  a = batch["pixel_affine"].astype(np.float64)
  per_example = (len(x),) + (1,) * (x.ndim - 2)
  luma = (x @ LUMA).reshape(len(x), -1).mean(1).reshape(*per_example, 1)
  return (np.einsum("b...c,bcd->b...d", x, a[:, :3]) + a[:, 3].reshape(*per_example, 3)
          + luma * a[:, 4].reshape(*per_example, 3))
