r"""A synthetic *motion* video dataset: the class is how a shape moves.

Built on first use by ``main.py train --config=demo`` (``prepare``; sizes from
``config.demo_dataset``), or from Python with ``build_demo_dataset(output_dir)``.

Every video shows one random shape (triangle, bar, arrow, L or cross; random
colour, size, position and orientation) over a random smooth texture, with
pixel noise. The class is the motion: translation left/right/up/down,
rotation clockwise/counter-clockwise, growing, shrinking. Any single frame
is a plausible frame of every class, so a model has to compare frames.
Beware: a horizontal flip swaps left/right and cw/ccw, so train with flips
off (as for Something-Something-v2).

The videos are written as small H.264 mp4 files under `output_dir/videos/`
(with `train.csv` / `val.csv`) and go through the real shard writer
(`data.make_shards`) into `output_dir/train/` and `output_dir/val/`.
"""
from __future__ import annotations

import json
import os

import numpy as np

# Sorted, as the shard writer orders class names: CLASS_NAMES[i] is class i.
CLASS_NAMES = tuple(sorted(("move_left", "move_right", "move_up", "move_down",
                            "rotate_cw", "rotate_ccw", "grow", "shrink")))

_SHAPES = {
    "triangle": [(-0.6, -1.0), (0.6, -1.0), (0.0, 1.2)],
    "bar": [(-1.0, -0.35), (1.0, -0.35), (1.0, 0.35), (-1.0, 0.35)],
    "arrow": [(-1.0, -0.3), (0.2, -0.3), (0.2, -0.7), (1.0, 0.0), (0.2, 0.7), (0.2, 0.3), (-1.0, 0.3)],
    "ell": [(-1.0, -1.0), (1.0, -1.0), (1.0, -0.4), (-0.4, -0.4), (-0.4, 1.0), (-1.0, 1.0)],
    "cross": [(-0.3, -1.0), (0.3, -1.0), (0.3, -0.3), (1.0, -0.3), (1.0, 0.3), (0.3, 0.3),
              (0.3, 1.0), (-0.3, 1.0), (-0.3, 0.3), (-1.0, 0.3), (-1.0, -0.3), (-0.3, -0.3)],
}


def _polygon_mask(vertices: np.ndarray, height: int, width: int) -> np.ndarray:
  """Even-odd rasterisation of a polygon (pixel centres), (H, W) bool."""
  ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
  inside = np.zeros((height, width), bool)
  x0, y0 = vertices[:, 0], vertices[:, 1]
  x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
  for a, b, c, d in zip(x0, y0, x1, y1):
    crosses = (b > ys) != (d > ys)
    x_at = a + (ys - b) * (c - a) / (d - b + 1e-12)
    inside ^= crosses & (xs < x_at)
  return inside


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """Smooth random colour texture in [0, 255], (H, W, 3) float32."""
  cells = rng.integers(3, 9)
  coarse = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.float32)
  yi = np.linspace(0, cells - 1, height)
  xi = np.linspace(0, cells - 1, width)
  y0 = np.floor(yi).astype(int).clip(0, cells - 2)
  x0 = np.floor(xi).astype(int).clip(0, cells - 2)
  wy = (yi - y0)[:, None, None]
  wx = (xi - x0)[None, :, None]
  c = coarse
  top = c[y0][:, x0] * (1 - wx) + c[y0][:, x0 + 1] * wx
  bottom = c[y0 + 1][:, x0] * (1 - wx) + c[y0 + 1][:, x0 + 1] * wx
  tex = top * (1 - wy) + bottom * wy
  contrast = rng.uniform(0.15, 0.4)
  return (128 + (tex - 128) * contrast).astype(np.float32)


def render_video(label: int, rng: np.random.Generator, *, num_frames: int = 16, height: int = 64,
                 width: int = 80, noise: float = 6.0, oversample: int = 1) -> np.ndarray:
  """One video of class `label`, uint8 (num_frames * oversample, height, width, 3).

  `oversample` > 1 films the same motion at that many times the frame rate:
  frame u shows the scene at time (u - (oversample - 1) / 2) / oversample
  (in frames of the plain video), so the oversample frames around plain
  frame t are centred on it (for an odd factor, frame oversample * t + (oversample - 1) / 2
  is plain frame t). The random draws are the same as the plain video's up to the
  per-frame noise.
  """
  name = CLASS_NAMES[label]
  shape = np.asarray(_SHAPES[list(_SHAPES)[rng.integers(len(_SHAPES))]], np.float32)
  background = _texture(rng, height, width)
  colour = rng.uniform(0, 255, size=3).astype(np.float32)
  # Keep the shape's colour away from the background's mean colour.
  if np.abs(colour - background.mean((0, 1))).max() < 80:
    colour = 255 - colour
  short = min(height, width)
  size = rng.uniform(0.2, 0.28) * short          # half-extent in pixels
  angle = rng.uniform(0, 2 * np.pi)
  centre = np.array([rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height], np.float32)
  drift = rng.uniform(-0.15, 0.15, size=2).astype(np.float32)   # small motion in every class
  speed = rng.uniform(1.6, 2.4) * short / 64     # px / frame for translations
  spin = np.deg2rad(rng.uniform(8, 11))          # rad / frame; < 45 deg between sampled frames
  growth = rng.uniform(1.05, 1.07)               # factor / frame for size changes
  steps = num_frames - 1
  velocity = {"move_left": (-speed, 0), "move_right": (speed, 0), "move_up": (0, -speed),
              "move_down": (0, speed)}.get(name, (0, 0))
  velocity = np.asarray(velocity, np.float32) + drift
  # Start so that the path is centred in the frame.
  centre = centre - velocity * steps / 2
  centre[0] = np.clip(centre[0], size, width - size) if name not in ("move_left", "move_right") else centre[0]
  centre[1] = np.clip(centre[1], size, height - size) if name not in ("move_up", "move_down") else centre[1]
  if name in ("grow", "shrink"):  # Same mean size as the other classes: no single-frame cue.
    size *= growth ** (-steps / 2 if name == "grow" else steps / 2)
  frames = np.empty((num_frames * oversample, height, width, 3), np.uint8)
  for u in range(num_frames * oversample):
    t = u if oversample == 1 else (u - (oversample - 1) / 2) / oversample
    theta = angle + {"rotate_cw": spin * t, "rotate_ccw": -spin * t}.get(name, 0.0)
    scale = size * {"grow": growth ** t, "shrink": growth ** -t}.get(name, 1.0)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]], np.float32)
    vertices = shape @ rot.T * scale + centre + velocity * t
    mask = _polygon_mask(vertices, height, width)
    frame = background.copy()
    frame[mask] = colour
    frame += rng.normal(0, noise, size=frame.shape).astype(np.float32)
    frames[u] = np.clip(frame, 0, 255).astype(np.uint8)
  return frames


def write_mp4(path: str, frames: np.ndarray, fps: int = 8) -> None:
  """Encodes uint8 RGB frames as H.264 (near-lossless, crf 12) with PyAV."""
  import av
  with av.open(path, mode="w") as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": "12", "preset": "ultrafast", "tune": "zerolatency"}
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def build_demo_dataset(output_dir: str, *, train_per_class: int = 100, val_per_class: int = 25,
                       num_frames: int = 16, height: int = 64, width: int = 80,
                       num_train_shards: int = 8, num_val_shards: int = 2, seed: int = 0,
                       workers: int = 2, progress: bool = False, oversample: int = 1,
                       frames_per_video: int = 0) -> dict:
  """Renders the videos, writes them as mp4 and shards them with `make_shards`.

  Defaults: 8 classes x (100 train + 25 val) videos of 16 frames at 64x80.
  `oversample` films the same motion with that many times the frames
  (`render_video`); `frames_per_video` is the writer's (`make_shards
  --frames_per_video`: keep that many frames, at segment centres; 0 = all).
  Finished shards are kept on a re-run (the writer resumes).

  Returns:
    dict with `train_dir`, `val_dir`, `label_map`, `class_names`, and the two
    writers' summaries (`train_info`, `val_info`).
  """
  from vfocal_jax.data import make_shards

  video_dir = os.path.join(output_dir, "videos")
  os.makedirs(video_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  splits = {"train": train_per_class, "val": val_per_class}
  for split, per_class in splits.items():
    lines = []
    for i in range(per_class * len(CLASS_NAMES)):
      label = i % len(CLASS_NAMES)
      video_rng = np.random.default_rng(rng.integers(2**63))
      suffix = f"_x{oversample}" if oversample > 1 else ""
      name = f"{split}_{i:05d}_{CLASS_NAMES[label]}{suffix}.mp4"
      path = os.path.join(video_dir, name)
      if not os.path.exists(path):
        frames = render_video(label, video_rng, num_frames=num_frames, height=height, width=width,
                              oversample=oversample)
        write_mp4(path + ".tmp.mp4", frames)
        os.replace(path + ".tmp.mp4", path)
      lines.append(f"{name},{CLASS_NAMES[label]}\n")
    with open(os.path.join(output_dir, f"{split}.csv"), "w") as f:
      f.writelines(lines)

  train_dir = os.path.join(output_dir, "train")
  val_dir = os.path.join(output_dir, "val")
  common = dict(video_root=video_dir, short_side=None, workers=workers, progress=progress,
                frames_per_video=frames_per_video)
  train_info = make_shards.make_shards(os.path.join(output_dir, "train.csv"), train_dir,
                                       num_train_shards, **common)
  label_map = os.path.join(train_dir, "labels.txt")
  val_info = make_shards.make_shards(os.path.join(output_dir, "val.csv"), val_dir, num_val_shards,
                                     label_map=label_map, **common)
  return {"train_dir": train_dir, "val_dir": val_dir, "label_map": label_map,
          "class_names": list(CLASS_NAMES), "train_info": train_info, "val_info": val_info}


LAYOUT_FIELDS = {"oversample": 2, "frames_per_video": 1}  # make_shards layouts the DONE marker records (least value).


def read_done_marker(path: str) -> dict[str, int]:
  """The layout a finished demo dataset was built with: its ``DONE`` file, checked.

  Empty (the default layout) or a JSON object of ``LAYOUT_FIELDS``, each an
  integer of at least its least value. Anything else is a ``BadFileError``
  naming the file: a damaged marker cannot say which data the directory
  holds, so it is never taken for the default; deleting the directory
  builds the data again.
  """
  from vfocal_jax import file_checks
  from vfocal_jax.errors import BadFileError
  try:
    with open(path, "rb") as f:
      text = file_checks.decode_text(f.read(file_checks.MAX_TEXT_BYTES + 1), path)
    if not text.strip():
      return {}
    built = dict(file_checks.mapping(file_checks.parse_json(text, path), path))
    for key, value in built.items():
      if key not in LAYOUT_FIELDS:
        raise BadFileError(path, f"has the unknown field {key[:40]!r}, expected only {', '.join(LAYOUT_FIELDS)}")
      file_checks.integer(value, path, key, lo=LAYOUT_FIELDS[key], hi=1 << 20)
    return built
  except BadFileError as e:
    raise BadFileError(path, f"{e.problem}; delete {os.path.dirname(path)} to build the demo data again") from None


def prepare(config, workdir: str):
  """The demo config's data: builds the shards once (process 0), points ``config.data`` at them.

  Only a config with a ``demo_dataset`` block and no ``data.train_shards`` is
  touched (``configs/demo.py``); any other config comes back as it is. The
  shards go to ``config.demo_data_dir``, else ``<workdir>/demo_data``, else
  (for a ``gs://`` workdir: PyAV renders local files) ``~/.cache/vfocal_jax/demo_data``.
  """
  import jax
  from absl import logging

  from vfocal_jax import config_fields, paths
  if "demo_dataset" not in config or config.data.train_shards:
    return config
  demo_dir = config.demo_data_dir or (
      os.path.expanduser("~/.cache/vfocal_jax/demo_data") if paths.is_url(workdir)
      else os.path.join(os.path.abspath(workdir), "demo_data"))
  config = config_fields.updated(config, {"data.train_shards": os.path.join(demo_dir, "train"),
                                          "data.eval_shards": config.data.eval_shards or os.path.join(demo_dir, "val")})
  settings = config.demo_dataset.to_dict()
  layout = {k: int(settings.get(k, 0)) for k in ("oversample", "frames_per_video")
            if int(settings.get(k, 0)) > (1 if k == "oversample" else 0)}
  done = os.path.join(demo_dir, "DONE")
  if jax.process_index() == 0 and not os.path.exists(done):
    logging.info("Demo: writing the synthetic motion dataset to %s ...", demo_dir)
    build_demo_dataset(demo_dir, progress=True, **settings)
    with open(done, "w") as f:
      f.write(json.dumps(layout) if layout else "")
  if os.path.exists(done):
    built = read_done_marker(done)
    if built != layout:
      from vfocal_jax import errors
      raise errors.MismatchError(f"{demo_dir} holds the demo data built with config.demo_dataset "
                                 f"{built or 'defaults'}, not {layout or 'defaults'}: give another --workdir or "
                                 "--config.demo_data_dir.")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("demo_data")
  return config
