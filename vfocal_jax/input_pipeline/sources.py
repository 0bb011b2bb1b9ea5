"""Where records come from: shard files (split per host) or a tfds dataset.

Both sources yield "raw" elements, dicts of
  `frames`   the video's frames: a vector of encoded strings, or uint8 (N,H,W,3)
             (shards: the serialized record in `record` instead, parsed later
             so that a corrupt record is caught where errors are counted),
  `file`     the shard (or dataset) the element came from, for messages,
  `missing`  > 0 only on a per-file end marker: records of that shard that
             could not be read (truncated / corrupt file), counted as skipped,
  `is_end`   whether this element is such an end marker.

Every path here may be a local path or a URL (``gs://bucket/...``): files are
listed, tested and read with `tf.io.gfile` (TensorFlow's file systems, the
ones tf.data reads the records with), never with os.path / glob / open.
"""
from __future__ import annotations

import dataclasses
import os

import tensorflow as tf

from vfocal_jax import errors, file_checks
from vfocal_jax.input_pipeline import shard_format


def is_url(path: str) -> bool:
  """Whether `path` names a file system by scheme (``gs://``, ...) rather than a local file."""
  return "://" in path


def expand(path: str) -> str:
  """`~` expanded in local paths; URLs as they are."""
  return path if is_url(path) else os.path.expanduser(path)


def join(path: str, *parts: str) -> str:
  """Path joining that keeps URLs URLs (`/` separators)."""
  return tf.io.gfile.join(path, *parts)


def parent(path: str) -> str:
  """The directory of a file (local path or URL)."""
  path = path.rstrip("/")
  if is_url(path):
    head, _, _ = path.rpartition("/")
    return head if "://" in head else path   # gs://bucket has no parent
  return os.path.dirname(path)


def basename(path: str) -> str:
  return path.rstrip("/").rpartition("/")[2] if is_url(path) else os.path.basename(path)


def read_text(path: str) -> str:
  """A text file of any size (make_shards' CSV).

  Missing -> ``MissingFileError``; binary or non-UTF-8 -> ``BadFileError`` naming it.
  """
  if not tf.io.gfile.exists(path):
    raise errors.MissingFileError(path)
  with tf.io.gfile.GFile(path, "rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise file_checks.BadFileError(path, f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
  if "\x00" in text:
    raise file_checks.BadFileError(path, f"not a text file (a NUL byte at offset {text.index(chr(0))})")
  return text


def read_lines(path: str) -> list[str]:
  """Non-blank lines without their line ends (label maps); a binary or non-UTF-8 file is a ``BadFileError``."""
  with tf.io.gfile.GFile(path, "rb") as f:
    text = file_checks.decode_text(f.read(file_checks.MAX_TEXT_BYTES + 1), path)
  text = text[1:] if text.startswith("\ufeff") else text
  return [line.rstrip("\r\n") for line in text.splitlines() if line.strip()]


def read_label_map(path: str) -> tuple[str, ...]:
  """Class names, one per line (line i is class i): each once, none longer than 1,000 characters."""
  names = read_lines(path)
  if not names:
    raise file_checks.BadFileError(path, "no class names (expected one per line)")
  seen: dict[str, int] = {}
  for i, name in enumerate(names):
    if len(name) > 1000:
      raise file_checks.BadFileError(path, f"line {i + 1} is {len(name):,} characters long; is this a label map?")
    file_checks.printable(name, path, i + 1, "class name")
    if name in seen:
      raise file_checks.BadFileError(path, f"class {name[:60]!r} appears twice (lines {seen[name] + 1} and {i + 1})")
    seen[name] = i
  return tuple(names)


def read_dataset_info(path: str) -> dict:
  """``dataset_info.json`` (make_shards, or another tool's), checked: what the pipeline uses must make sense.

  Per-shard counts are integers >= 0 that add up to ``num_examples`` when both
  are given; ``num_classes`` >= 1 agrees with ``label_names``; ``frames_per_video`` >= 0.
  """
  with tf.io.gfile.GFile(path, "rb") as f:
    info = file_checks.mapping(file_checks.parse_json(f.read(file_checks.MAX_TEXT_BYTES + 1), path), path)
  fc = file_checks
  shards = fc.mapping(info.get("shards", {}), path, "shards")
  for name, n in shards.items():
    fc.integer(n, path, f"shards[{name[:60]!r}]", lo=0, hi=10 ** 12)
    if not name or "/" in name:
      raise fc.BadFileError(path, f"shards has the entry {name[:60]!r}, expected a file name in this directory")
  if info.get("num_examples") is not None:
    total = fc.integer(info["num_examples"], path, "num_examples", lo=0, hi=10 ** 12)
    if shards and sum(shards.values()) != total:
      raise fc.BadFileError(path, f"the shards' counts add up to {sum(shards.values())}, num_examples says {total}")
  if info.get("num_classes") is not None:
    fc.integer(info["num_classes"], path, "num_classes", lo=1, hi=1 << 20)
  if info.get("label_names") is not None:
    names = fc.strings(info["label_names"], path, "label_names", max_len=1 << 20)
    if info.get("num_classes") is not None and len(names) != info["num_classes"]:
      raise fc.BadFileError(path, f"label_names has {len(names)} names, num_classes says {info['num_classes']}")
  if info.get("frames_per_video") is not None:
    fc.integer(info["frames_per_video"], path, "frames_per_video", lo=0, hi=1 << 20)
  return info


def write_text(path: str, text: str) -> None:
  """Writes a small file whole (to a temporary name first, so readers never see half of it)."""
  tmp = path + ".tmp"
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(text)
  tf.io.gfile.rename(tmp, path, overwrite=True)


@dataclasses.dataclass(frozen=True)
class ShardSet:
  """The shard files of one split, and what dataset_info.json says about them."""
  files: tuple[str, ...]
  counts: tuple[int, ...] | None      # records per file, when known
  num_classes: int | None
  label_names: tuple[str, ...] | None
  # make_shards --frames_per_video of the shards (the largest if directories differ; 0: every
  # frame, or unknown) and the dataset_info.json that says so.
  frames_per_video: int = 0
  frames_per_video_source: str = ""

  @property
  def num_examples(self) -> int | None:
    return None if self.counts is None else sum(self.counts)


def list_shards(spec: str) -> list[str]:
  """Expands a directory / glob / comma-separated list (local or ``gs://``) into sorted shard files."""
  if not spec:
    raise errors.ConfigError("No shards given (set config.data.train_shards / eval_shards).")
  files: list[str] = []
  for part in (expand(p.strip()) for p in spec.split(",")):
    if not part:
      continue
    if any(ch in part for ch in "*?["):
      found = tf.io.gfile.glob(part)
    elif tf.io.gfile.isdir(part):
      found = tf.io.gfile.glob(join(part, "*.tfrecord*"))
    else:
      found = [part] if tf.io.gfile.exists(part) else []
    found = [f for f in found if not f.endswith((".json", ".tmp"))]
    if not found:
      raise errors.MissingFileError(part, "no shard files match (a directory of *.tfrecord*, a glob or a file)")
    files.extend(found)
  return sorted(set(files))


def load_shard_set(spec: str, label_map: str = "") -> ShardSet:
  """Lists the shards and reads dataset_info.json / labels.txt beside them (or `label_map`)."""
  files = list_shards(spec)
  counts = num_classes = label_names = None
  infos = {}
  for directory in sorted({parent(f) for f in files}):
    path = join(directory, shard_format.INFO_FILENAME)
    if tf.io.gfile.exists(path):
      infos[directory] = read_dataset_info(path)
  per_file = {}
  for directory, info in infos.items():
    for name, n in info.get("shards", {}).items():
      per_file[join(directory, name)] = n
  if files and all(f in per_file for f in files):
    counts = tuple(per_file[f] for f in files)
  frames_per_video, frames_source = 0, ""
  for directory, info in infos.items():
    if int(info.get("frames_per_video") or 0) > frames_per_video:
      frames_per_video = int(info["frames_per_video"])
      frames_source = join(directory, shard_format.INFO_FILENAME)
  if infos:
    first = next(iter(infos.values()))
    num_classes = first.get("num_classes")
    label_names = tuple(first["label_names"]) if first.get("label_names") else None
  label_file = expand(label_map) if label_map else join(parent(files[0]), shard_format.LABELS_FILENAME)
  if tf.io.gfile.exists(label_file):
    names = read_label_map(label_file)
    beside = infos.get(parent(files[0]))
    if not label_map and beside is not None:  # Written together by make_shards: one of them is damaged.
      info_file = join(parent(files[0]), shard_format.INFO_FILENAME)
      if beside.get("label_names") and tuple(beside["label_names"]) != names:
        raise file_checks.BadFileError(label_file, f"its {len(names)} class names differ from the "
                                                   f"{len(beside['label_names'])} label_names of {info_file}")
      if beside.get("num_classes") is not None and beside["num_classes"] != len(names):
        raise file_checks.BadFileError(label_file, f"{len(names)} class names, but {info_file} says num_classes="
                                                   f"{beside['num_classes']}")
    label_names, num_classes = names, len(names)
  elif label_map:
    raise errors.MissingFileError(label_file, "Label map not found (config.data.label_map)")
  return ShardSet(tuple(files), counts, num_classes, label_names, frames_per_video, frames_source)


def first_record_kept_frames(path: str) -> tuple[int, int] | None:
  """(stored frames, the video's frames) when the first record of a shard file keeps only
  some of its video's frames (it has `image/frame_index`); None otherwise or when unreadable.

  Shards without dataset_info.json say this way that they were written with
  make_shards --frames_per_video.
  """
  for record in tf.data.TFRecordDataset(path).take(1).ignore_errors():
    try:
      ex = shard_format.parse_sequence_example(record)
    except tf.errors.OpError:
      return None
    if int(tf.size(ex["frame_index"])) == 0:
      return None
    return int(tf.shape(ex["frames"])[0]), int(ex["num_video_frames"])
  return None


@dataclasses.dataclass(frozen=True)
class HostSplit:
  """This host's part of a split: whole files, or every P-th record of every file."""
  files: tuple[str, ...]
  counts: tuple[int, ...] | None   # records this host reads from each of its files
  record_shards: int = 1           # P when files are split record-wise
  record_index: int = 0


def split_for_host(shards: ShardSet, process_index: int, process_count: int) -> HostSplit:
  """Disjoint, complete per-host parts of the split.

  With at least as many files as hosts, host p reads files p, p + P, ...;
  otherwise every host reads every file and keeps records p, p + P, ...
  """
  files, counts = shards.files, shards.counts
  if process_count <= 1:
    return HostSplit(files, counts)
  if len(files) >= process_count:
    mine = range(process_index, len(files), process_count)
    return HostSplit(tuple(files[i] for i in mine),
                     None if counts is None else tuple(counts[i] for i in mine))
  per_host = None if counts is None else tuple(
      max(0, (n - process_index + process_count - 1) // process_count) for n in counts)
  return HostSplit(files, per_host, process_count, process_index)


def count_records(files: tuple[str, ...]) -> tuple[int, ...]:
  """Counts readable records by reading the files (when no dataset_info.json)."""
  out = []
  for f in files:
    ds = tf.data.TFRecordDataset(f).ignore_errors()
    out.append(int(ds.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1)))
  return tuple(out)


def _read_one_file(path: tf.Tensor, expected: tf.Tensor, record_shards: int, record_index: int):
  """Records of one file, then an end marker carrying how many could not be read."""
  records = tf.data.TFRecordDataset(path)
  if record_shards > 1:
    records = records.shard(record_shards, record_index)
  records = records.map(lambda r: {"record": r, "file": path, "missing": tf.constant(0, tf.int64),
                                   "is_end": tf.constant(False)})
  records = records.ignore_errors()   # A truncated / corrupt file ends early here.
  end = tf.data.Dataset.from_tensors({"record": tf.constant(b""), "file": path,
                                      "missing": tf.constant(0, tf.int64),
                                      "is_end": tf.constant(True)})

  def count(n_read, elem):
    missing = tf.where(elem["is_end"] & (expected >= 0), tf.maximum(expected - n_read, 0),
                       tf.constant(0, tf.int64))
    return n_read + 1, dict(elem, missing=missing)

  return records.concatenate(end).scan(tf.constant(0, tf.int64), count)


def raw_shard_dataset(split: HostSplit, *, shuffle_files: bool, repeat: bool, seed: int,
                      cycle_length: int, num_threads: int) -> tf.data.Dataset:
  """Interleaved records of this host's files (plus per-file end markers)."""
  expected = split.counts if split.counts is not None else (-1,) * len(split.files)
  files = tf.data.Dataset.from_tensor_slices((list(split.files), [int(x) for x in expected]))
  if shuffle_files:
    files = files.shuffle(len(split.files), seed=seed, reshuffle_each_iteration=True)
  if repeat:
    files = files.repeat()
  cycle = max(1, min(cycle_length, len(split.files)))
  return files.interleave(
      lambda f, n: _read_one_file(f, tf.cast(n, tf.int64), split.record_shards, split.record_index),
      cycle_length=cycle, block_length=1, num_parallel_calls=min(cycle, num_threads),
      deterministic=True)


# --- tfds ---------------------------------------------------------------------


def tfds_builder(name: str, data_dir: str = ""):
  """A tfds builder by catalog name (or a locally prepared dataset's name).

  A copy prepared under `data_dir` (local or ``gs://``) is opened from its files (features,
  class names, split sizes all from disk), so the builder's code is not
  needed; otherwise the catalog builder is used (nothing is downloaded:
  as_dataset only reads prepared files).
  """
  import tensorflow_datasets as tfds
  data_dir = expand(data_dir) if data_dir else ""
  if data_dir and ":" not in name and "/" not in name:
    root = join(data_dir, name)
    found = tf.io.gfile.listdir(root) if tf.io.gfile.isdir(root) else []
    versions = sorted((d.rstrip("/") for d in found
                       if tf.io.gfile.exists(join(root, d.rstrip("/"), "dataset_info.json"))),
                      key=lambda v: tuple(int(x) for x in v.split(".") if x.isdigit()))
    if versions:
      return tfds.builder_from_directory(join(root, versions[-1]))
  return tfds.builder(name, data_dir=data_dir or None)


def tfds_split_sizes(builder, splits: list[str]) -> tuple[int, ...] | None:
  """Examples in each (sub)split from the metadata; None when it has none (e.g. mock data)."""
  try:
    return tuple(int(builder.info.splits[s].num_examples) for s in splits)
  except (KeyError, ValueError):
    return None


def tfds_split_for_host(split: str, process_index: int, process_count: int) -> str:
  import tensorflow_datasets as tfds
  if process_count <= 1:
    return split
  return tfds.even_splits(split, n=process_count)[process_index]


def raw_tfds_dataset(builder, split: str, *, video_key: str, label_key: str, shuffle_files: bool,
                     seed: int) -> tf.data.Dataset:
  """Elements of a tfds dataset, frames left encoded when the feature allows it."""
  import tensorflow_datasets as tfds
  feature = builder.info.features[video_key]
  decoders = None
  if isinstance(feature, tfds.features.Video) and getattr(feature, "_encoding_format", None) != "none":
    decoders = {video_key: tfds.decode.SkipDecoding()}
  read_config = tfds.ReadConfig(shuffle_seed=seed, try_autocache=False)
  ds = builder.as_dataset(split=split, shuffle_files=shuffle_files, decoders=decoders,
                          read_config=read_config)
  name = tf.constant(f"tfds:{builder.info.full_name}:{split}")

  def to_raw(ex):
    return {"frames": ex[video_key], "label": tf.cast(ex[label_key], tf.int32), "file": name,
            "missing": tf.constant(0, tf.int64), "is_end": tf.constant(False)}

  return ds.map(to_raw)


def with_final_marker(raw: tf.data.Dataset) -> tf.data.Dataset:
  """Appends an end marker so that failures at the very end of a finite stream are counted."""
  spec = raw.element_spec
  marker = {k: tf.zeros([0 if d is None else d for d in v.shape], v.dtype) for k, v in spec.items()}
  marker.update(is_end=tf.constant(True), missing=tf.constant(0, tf.int64), file=tf.constant("end"))
  return raw.concatenate(tf.data.Dataset.from_tensors(marker))
