r"""Input-pipeline throughput (a benchmark, not a test).

    python benchmarks/bench_input_pipeline.py [--threads 1] [--seconds 10]
    python benchmarks/bench_input_pipeline.py --mode frames_per_video [--threads 1] [--rounds 2] \
        [--round_batches 40]

Writes synthetic shards with 256 x 340 px JPEG frames (the K400 layout after
`make_shards --short_side 256`), then measures, with `--threads` tf.data
threads:
  * the training pipeline at 8 x 224 x 224 (segment sampling, random resized
    crop, flip, resize to uint8, colour jitter + normalisation drawn as the
    per-clip `pixel_affine` that the device applies): clips/s;
  * the ceiling: plain `tf.io.decode_jpeg` of the same frames, in frames/s,
    divided by 8 -> clips/s; the ratio pipeline / ceiling is the figure of
    merit (target >= 0.8; it can exceed 1 because the pipeline decodes only
    the crop window);
  * the evaluation pipeline with 4 clips x 3 crops (32 frames decoded per
    video): videos/s;
  * where the train pipeline's time goes, each part alone on the same
    thread budget, in ms per clip: reading the records (TFRecord files, all
    frames of a video), reading + parsing them, and decoding the 8 sampled
    frames inside random-resized-crop windows with and without the resize
    to 224 x 224.

`--mode frames_per_video` compares shards that keep every frame with shards
written with `make_shards --frames_per_video=M` (M = 32 and 64 by default):
it films `--num_videos` 10-s, 30-fps videos at 256 x 340 (the demo's motion,
`oversample=30`, textured and noisy: realistic JPEG sizes), writes them with
the real writer (`make_shards.write_shard`) once per M, and prints, side by
side, the bytes of a record (read whole for each training clip) and the
training pipeline's rate (8 x 224 x 224), with their ratios to M = 0. The
rate per core is clips per CPU-second of this process (all its threads),
which a machine shared with other work does not dilute as it does clips per
wall-second (printed too); each round takes `--round_batches` batches from
every pipeline in turn, and the best round is kept.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from vfocal_jax.data import demo_dataset  # noqa: E402
from vfocal_jax import input_pipeline as ip
from vfocal_jax.configs import data as data_config  # noqa: E402
from vfocal_jax.input_pipeline import shard_format  # noqa: E402


def write_shards(directory: str, num_videos: int, num_frames: int, height: int, width: int) -> list[bytes]:
  """Synthetic motion videos (textured, noisy) as JPEG shards; returns all JPEG strings."""
  rng = np.random.default_rng(0)
  all_jpegs = []
  per_shard = {}
  writers = [tf.io.TFRecordWriter(os.path.join(directory, f"shard-{i:05d}-of-00004.tfrecord"))
             for i in range(4)]
  for v in range(num_videos):
    label = v % len(demo_dataset.CLASS_NAMES)
    frames = demo_dataset.render_video(label, rng, num_frames=num_frames, height=height, width=width,
                                       noise=8.0)
    jpegs = [tf.io.encode_jpeg(f, quality=90).numpy() for f in frames]
    all_jpegs += jpegs
    writers[v % 4].write(shard_format.make_sequence_example(jpegs, label).SerializeToString())
    name = f"shard-{v % 4:05d}-of-00004.tfrecord"
    per_shard[name] = per_shard.get(name, 0) + 1
  for w in writers:
    w.close()
  with open(os.path.join(directory, shard_format.INFO_FILENAME), "w") as f:
    json.dump({"num_examples": num_videos, "num_classes": 8, "shards": per_shard}, f)
  return all_jpegs


def write_kept_frame_shards(directory: str, videos: list[np.ndarray], frames_per_video: int) -> dict:
  """`videos` through the real shard writer into one shard (+ dataset_info.json); returns its stats."""
  from vfocal_jax.data import make_shards  # noqa: PLC0415
  os.makedirs(directory, exist_ok=True)
  entries = [make_shards.VideoEntry(f"v{i}", f"v{i}", i % 8, None) for i in range(len(videos))]
  name = make_shards.shard_name(0, 1)
  stats = make_shards.write_shard(os.path.join(directory, name), entries, short_side=None, max_fps=None,
                                  jpeg_quality=90, frames_per_video=frames_per_video,
                                  decode_fn=lambda path, **_: videos[int(path[1:])])
  with open(os.path.join(directory, shard_format.INFO_FILENAME), "w") as f:
    json.dump({"num_examples": len(videos), "num_classes": 8, "shards": {name: len(videos)},
               "frames_per_video": frames_per_video}, f)
  return stats


def frames_per_video_table(args) -> None:
  """Bytes per training clip and clips/s per core with M = 0 and each `--kept_frames` (module docstring)."""
  rng = np.random.default_rng(0)
  t0 = time.perf_counter()
  videos = [demo_dataset.render_video(v % 8, rng, num_frames=10, height=256, width=340, noise=8.0,
                                      oversample=30) for v in range(args.num_videos)]
  print(f"filmed {len(videos)} videos of {videos[0].shape[0]} frames (10 s at 30 fps) at 256x340 "
        f"in {time.perf_counter() - t0:.1f}s")
  ms = [0] + [int(m) for m in args.kept_frames.split(",")]
  with tempfile.TemporaryDirectory() as tmp:
    iterators, sizes, frames = {}, {}, {}
    for m in ms:
      directory = os.path.join(tmp, f"m{m}")
      stats = write_kept_frame_shards(directory, videos, m)
      files = tf.io.gfile.glob(os.path.join(directory, "*.tfrecord"))
      sizes[m] = np.mean([len(r) for r in tf.data.TFRecordDataset(files).as_numpy_iterator()])
      frames[m] = stats["num_frames"] / len(videos)
      cfg = data_config.get_config()
      cfg.train_shards = directory
      cfg.num_threads = args.threads
      cfg.shuffle_buffer_size = len(videos)
      iterators[m] = ip.create_train_iterator(cfg, batch_size=args.batch_size, seed=0, num_frames=8,
                                              image_size=224)
      next(iterators[m])
    rates, cpu_rates = {m: 0.0 for m in ms}, {m: 0.0 for m in ms}
    for _ in range(args.rounds):
      for m in ms:
        wall, cpu = wall_and_cpu_rates(iterators[m], lambda b: b["video"].shape[0], args.round_batches)
        rates[m], cpu_rates[m] = max(rates[m], wall), max(cpu_rates[m], cpu)
    iterators.clear()   # Stop the pipelines before their files go.
  per = "per core" if args.threads == 1 else f"with {args.threads} threads"
  print(f"\ntraining clips 8x224x224, {per}, best of {args.rounds} rounds of {args.round_batches} batches "
        f"of {args.batch_size}; "
        f"a record is read whole for each clip")
  print("| frames_per_video | frames kept | bytes read per clip | vs M=0 | clips per CPU-second | vs M=0 "
        "| clips per wall-second | vs M=0 |")
  print("|---|---|---|---|---|---|---|---|")
  for m in ms:
    print(f"| {m or '0 (every frame)'} | {frames[m]:.0f} | {sizes[m] / 1e6:.2f} MB "
          f"({sizes[m] / frames[m] / 1024:.1f} KiB a frame) | {sizes[m] / sizes[0]:.3f} | "
          f"{cpu_rates[m]:.1f} | {cpu_rates[m] / cpu_rates[0]:.2f} | {rates[m]:.1f} | {rates[m] / rates[0]:.2f} |")


def wall_and_cpu_rates(iterator, count_fn, batches: int) -> tuple[float, float]:
  """Items per wall-second and per CPU-second of this process (all threads) over `batches` batches.

  A count of batches, not a time: the prefetched batches then weigh the same in every round.
  """
  n, wall, cpu = 0, time.perf_counter(), time.process_time()
  for _ in range(batches):
    n += count_fn(next(iterator))
  return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def rate(iterator, count_fn, seconds: float, warmup: int = 3) -> float:
  for _ in range(warmup):
    next(iterator)
  n, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    n += count_fn(next(iterator))
  return n / (time.perf_counter() - start)


def breakdown(directory: str, jpegs: list[bytes], frames_per_video: int, options: tf.data.Options,
              threads: int, seconds: float) -> dict[str, float]:
  """ms per clip of the train pipeline's parts, each alone (see the module docstring)."""
  from vfocal_jax.input_pipeline import transforms  # noqa: PLC0415
  files = tf.io.gfile.glob(os.path.join(directory, "*.tfrecord"))
  records = tf.data.TFRecordDataset(files).repeat()
  rng = np.random.default_rng(1)
  picks = rng.integers(0, len(jpegs), (256, 8))
  clips = tf.data.Dataset.from_tensor_slices([[jpegs[i] for i in row] for row in picks]).repeat()

  def crop_decode(frames, size=None):
    shape = tf.image.extract_jpeg_shape(frames[0])
    box = transforms.random_resized_crop_box(shape[0], shape[1], area_range=(0.08, 1.0),
                                             aspect_ratio_range=(3 / 4, 4 / 3),
                                             seed=tf.stack([tf.strings.to_hash_bucket_fast(frames[0], 1 << 30),
                                                            tf.constant(0, tf.int64)]))
    video = tf.stack([tf.image.decode_and_crop_jpeg(frames[i], box, channels=3) for i in range(8)])
    return transforms.resize_uint8(video, (size, size)) if size else tf.shape(video)

  parts = {
      f"read records ({frames_per_video} JPEG frames each)": records.map(tf.strings.length),
      "read + parse records": records.map(lambda r: tf.shape(shard_format.parse_sequence_example(r)["frames"])),
      "decode 8 frames inside a random-resized-crop window": clips.map(crop_decode),
      "  ... + resize to 224x224 uint8": clips.map(lambda f: crop_decode(f, 224)[0, 0, 0]),
  }
  out = {}
  for name, ds in parts.items():
    it = iter(ds.map(lambda x: x, num_parallel_calls=threads).prefetch(2).with_options(options))
    out[name] = 1000 / rate(it, lambda _: 1, seconds)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--mode", choices=("throughput", "frames_per_video"), default="throughput")
  parser.add_argument("--threads", type=int, default=1, help="tf.data threads (1 = per core)")
  parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per figure")
  parser.add_argument("--num_videos", type=int, default=None,
                      help="videos written (default: 24 in throughput mode, 4 in frames_per_video mode)")
  parser.add_argument("--video_frames", type=int, default=64, help="throughput mode: frames per video")
  parser.add_argument("--kept_frames", default="32,64", help="frames_per_video mode: the M compared with 0")
  parser.add_argument("--rounds", type=int, default=2, help="frames_per_video mode: measuring rounds")
  parser.add_argument("--round_batches", type=int, default=40, help="frames_per_video mode: batches a round")
  parser.add_argument("--batch_size", type=int, default=8)
  args = parser.parse_args()
  tf.config.set_visible_devices([], "GPU")
  if args.mode == "frames_per_video":
    args.num_videos = args.num_videos or 4
    frames_per_video_table(args)
    return
  args.num_videos = args.num_videos or 24

  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    jpegs = write_shards(tmp, args.num_videos, args.video_frames, 256, 340)
    print(f"wrote {args.num_videos} videos x {args.video_frames} frames of 256x340 "
          f"({np.mean([len(j) for j in jpegs]) / 1024:.1f} KiB/frame) in {time.perf_counter() - t0:.1f}s")

    options = tf.data.Options()
    options.threading.private_threadpool_size = args.threads
    options.threading.max_intra_op_parallelism = 1
    raw = (tf.data.Dataset.from_tensor_slices(jpegs).repeat()
           .map(lambda j: tf.io.decode_jpeg(j, channels=3), num_parallel_calls=args.threads)
           .batch(64).prefetch(2).with_options(options))
    frames_per_s = rate(iter(raw), lambda b: b.shape[0], args.seconds)
    ceiling = frames_per_s / 8

    cfg = data_config.get_config()
    cfg.train_shards = cfg.eval_shards = tmp
    cfg.num_threads = args.threads
    cfg.shuffle_buffer_size = 64
    train = ip.create_train_iterator(cfg, batch_size=args.batch_size, seed=0, num_frames=8, image_size=224)
    clips_per_s = rate(train, lambda b: b["video"].shape[0], args.seconds)

    def eval_batches():
      while True:
        ev = ip.create_eval_iterator(cfg, batch_size=args.batch_size, num_frames=8, image_size=224,
                                     num_clips=4, num_crops=3)
        yield from ev

    videos_per_s = rate(eval_batches(), lambda b: int(b["mask"].sum()), args.seconds, warmup=1)
    parts = breakdown(tmp, jpegs, args.video_frames, options, args.threads, args.seconds / 2)

  per = "per core" if args.threads == 1 else f"with {args.threads} threads"
  print(f"raw tf.io.decode_jpeg (256x340): {frames_per_s:8.1f} frames/s {per} -> ceiling "
        f"{ceiling:.1f} clips/s of 8 frames")
  print(f"train pipeline 8x224x224:        {clips_per_s:8.1f} clips/s {per}  "
        f"ratio to ceiling {clips_per_s / ceiling:.2f}")
  print(f"eval pipeline 4x3 views:         {videos_per_s:8.1f} videos/s {per} "
        f"({12 * videos_per_s:.1f} views/s)")
  print(f"\nms per training clip ({per}): whole pipeline {1000 / clips_per_s:.2f}; "
        f"8 full-frame decodes (ceiling) {1000 / ceiling:.2f}")
  for name, ms in parts.items():
    print(f"  {name:58s} {ms:6.2f}")


if __name__ == "__main__":
  main()
