r"""A tfds builder over a folder of videos + CSVs (`path,label` per line).

    import tensorflow_datasets as tfds
    from vfocal_jax.data.tfds_builder import VideoCsv
    builder = VideoCsv(data_dir="~/tensorflow_datasets",
                       splits={"train": "train.csv", "test": "val.csv"}, video_root="videos/")
    builder.download_and_prepare()     # offline: reads local files only

Then train with `config.data.source = 'tfds'`, `tfds_name = 'video_csv'`,
`tfds_data_dir = <data_dir>` (a prepared dataset is found by name and
data_dir without importing this module). Frames are stored as JPEG in a
`tfds.features.Video`, labels as a `ClassLabel` (names sorted, as
`make_shards` does), plus the file name. Videos that cannot be decoded are
logged and left out. The CSVs, the video root and `data_dir` may be local
paths or ``gs://`` URLs.
"""
from __future__ import annotations

import os

import tensorflow_datasets as tfds
from absl import logging

from vfocal_jax.data import make_shards
from vfocal_jax.input_pipeline import sources
from vfocal_jax.input_pipeline.video_io import VideoDecodeError, decode_video_file


class VideoCsv(tfds.core.GeneratorBasedBuilder):
  """Videos listed in CSV files, one CSV per split."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    """No checksums file or metadata folder beside this module.

    (tfds 4.9.10 would otherwise look this module up through the
    `importlib_resources` backport, which it does not install on Python 3.11.)
    """
    return None

  def __init__(self, *, splits: dict[str, str] | None = None, video_root: str | None = None,
               label_names: list[str] | None = None, short_side: int | None = 256,
               max_fps: float | None = None, **kwargs):
    """
    Args:
      splits: split name -> CSV path (needed to prepare, not to load).
      video_root: directory the CSV paths are relative to.
      label_names: class names (index order); default: the sorted names found
        in all CSVs, or range(max + 1) when the labels are integers.
      short_side: resize frames so that the short side has this many pixels.
      max_fps: drop frames of faster videos.
      **kwargs: for tfds.core.GeneratorBasedBuilder (data_dir, ...).
    """
    self._splits = dict(splits or {})
    self._video_root = video_root
    self._short_side = short_side
    self._max_fps = max_fps
    self._rows = {name: make_shards.read_csv(path) for name, path in self._splits.items()}
    if label_names is None and self._rows:
      labels = [label for rows in self._rows.values() for _, label in rows]
      label_names = make_shards.build_label_names(labels)
      if label_names is None:
        label_names = [str(i) for i in range(max(int(x) for x in labels) + 1)]
    if label_names is None and not self._rows:
      label_names = self._prepared_label_names(kwargs.get("data_dir"))
    self._label_names = label_names
    super().__init__(**kwargs)

  @classmethod
  def _prepared_label_names(cls, data_dir: str | None) -> list[str] | None:
    """Class names of an already prepared copy (loading by class without the CSVs)."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    data_dir = sources.expand(data_dir or os.path.join("~", "tensorflow_datasets"))
    path = sources.join(data_dir, cls.name, str(cls.VERSION), "label.labels.txt")
    if not tf.io.gfile.exists(path):
      return None
    return sources.read_lines(path)

  def _info(self) -> tfds.core.DatasetInfo:
    label = (tfds.features.ClassLabel(names=self._label_names) if self._label_names
             else tfds.features.ClassLabel(num_classes=1))
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "video": tfds.features.Video(shape=(None, None, None, 3), encoding_format="jpeg"),
            "label": label,
            "filename": tfds.features.Text(),
        }),
        supervised_keys=("video", "label"),
        description="Videos listed in CSV files (path,label), frames stored as JPEG.")

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    if not self._splits:
      raise ValueError("VideoCsv needs splits={'train': 'train.csv', ...} to be prepared.")
    return {name: self._generate_examples(name) for name in self._splits}

  def _generate_examples(self, split: str):
    entries = make_shards.resolve_entries(self._rows[split], self._video_root, self._label_names)
    for entry in entries:
      if entry.label < 0:
        logging.warning("VideoCsv: %s: label %r not in the label map; skipped.", entry.path,
                        entry.label_text)
        continue
      try:
        frames = decode_video_file(entry.full_path, short_side=self._short_side, max_fps=self._max_fps)
      except VideoDecodeError as e:
        logging.warning("VideoCsv: skipped %s", e)
        continue
      yield entry.path, {"video": frames, "label": entry.label, "filename": entry.path}


def prepare(data_dir: str, splits: dict[str, str], video_root: str, **kwargs) -> str:
  """Builds the dataset into data_dir (local or ``gs://``); returns the prepared dataset's directory."""
  builder = VideoCsv(data_dir=sources.expand(data_dir), splits=splits, video_root=video_root, **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return str(builder.data_dir)
