"""Independent references for tests: lossless videos with known frames, and test views cut in NumPy.

Written from the released test protocol, not from the library: segment
sampling takes, in each of T equal segments of the first n - interval + 1
frames, the point at fraction (k + 0.5) / clips (clip k); 3 crops lie along
the long side (start, centre, end) of frames whose short side is already the
input size; pixels are normalised with the ImageNet mean/std.
"""
import numpy as np

MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])


def write_ffv1(path, frames: np.ndarray, fps: int = 8) -> None:
  """A lossless (FFV1) video: decoding gives back exactly ``frames`` (N, H, W, 3) uint8."""
  import av
  with av.open(str(path), "w") as container:
    stream = container.add_stream("ffv1", rate=fps)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = "bgr0"
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def eval_views(frames: np.ndarray, *, num_frames: int, size: int, clips: int, crops: int, interval: int,
               normalise: bool = True) -> np.ndarray:
  """(clips * crops, T, size, size, 3) views of frames whose short side is ``size`` (float64 if normalised)."""
  n, h, w, _ = frames.shape
  assert min(h, w) == size, "the reference needs no resize: the short side must be the input size"
  avg = (n - interval + 1) / num_frames
  starts = [0] if crops == 1 else [0, (max(h, w) - size) // 2, max(h, w) - size]
  if crops == 1:
    starts = [(max(h, w) - size) // 2]
  views = []
  for k in range(clips):
    clip = frames[[int(t * avg + avg * (k + 0.5) / clips) % n for t in range(num_frames)]]
    for s in starts:
      views.append(clip[:, :, s:s + size] if w >= h else clip[:, s:s + size])
  views = np.stack(views)
  return (views.astype(np.float64) - MEAN) / STD if normalise else views
