"""Every field of `config.data`, with its default and meaning (the recipes of this folder start here)."""
from __future__ import annotations

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The default data config; the recipes start from this and override fields.

  Clip length (`num_frames`), input size (`image_size`), batch size, seed and
  the number of eval views are arguments of the iterator factories, not data
  fields: they belong to the model / training config.
  """
  c = ml_collections.ConfigDict()

  # --- Where the videos are. ------------------------------------------------
  # 'shards': TFRecord SequenceExamples written by `python -m vfocal_jax.data.make_shards`
  # (or any DMVR-convention shards). 'tfds': a tfds dataset with a video feature.
  c.source = "shards"
  # A directory (all *.tfrecord* files in it), a glob, or a comma-separated
  # list of files/globs. The directory may hold dataset_info.json / labels.txt.
  c.train_shards = ""
  c.eval_shards = ""
  # Class names, one per line (line i = class i). Empty: labels.txt beside
  # the train shards when present.
  c.label_map = ""
  # Number of classes. -1: from dataset_info.json / label map / tfds info.
  # A record whose label is outside [0, num_classes) stops the run with an error naming
  # its shard (the head is the wrong size); corrupt records are skipped and counted.
  c.num_classes = -1

  # --- tfds source (source='tfds'). ----------------------------------------
  c.tfds_name = ""            # catalog name, e.g. 'ucf101', or a locally built one
  c.tfds_data_dir = ""        # tfds data_dir ('' = tfds default); nothing is downloaded
  c.tfds_train_split = "train"
  c.tfds_eval_split = "test"
  c.tfds_video_key = "video"  # sequence of encoded (jpeg/png) or decoded frames
  c.tfds_label_key = "label"

  # --- Temporal sampling. ---------------------------------------------------
  # 'segment' (official): the video is cut into num_frames equal segments,
  # one frame per segment: random position in training, the centre in test.
  # 'dense': num_frames frames `frame_interval` apart from a random start.
  # Shards written with make_shards --frames_per_video=M > 0 keep M frames per
  # video (segment centres): segment sampling draws among the kept frames of
  # each segment (docs/data.md); 'dense' is refused on them.
  c.sampling = "segment"
  # Segment sampling: the official sampler's `frame_interval` (its configs use
  # AUG.FRAME_INTERVAL = 4): the sampled span is the first N - interval + 1
  # frames. Dense sampling: the stride between frames.
  c.frame_interval = 1
  # Multi-clip test offsets: 'uniform' (deterministic, clips evenly spaced
  # inside each segment; the default) or 'random' (official: each clip an
  # independent training-style draw with interval 1, so results move between
  # runs by a few tenths).
  c.eval_clip_offsets = "uniform"
  # Defaults for the number of test views (create_eval_iterator's arguments win).
  c.eval_num_clips = 1
  c.eval_num_crops = 1

  # --- Training augmentation (one set of parameters per clip). -------------
  # Resize the short side to int(resize_ratio * image_size) (official 256/224)
  # before the random resized crop.
  c.train_resize_ratio = 256 / 224
  c.rrc_area_range = (0.08, 1.0)         # fraction of the (resized) frame area
  c.rrc_aspect_ratio_range = (3 / 4, 4 / 3)
  c.flip_prob = 0.5                      # 0 for Something-Something-v2 and the demo
  c.color_jitter_prob = 0.8              # official AUG.COLOR_JITTER
  c.brightness = 0.4                     # factor in [1 - b, 1 + b]
  c.contrast = 0.4
  c.saturation = 0.2
  c.hue = 0.1                            # shift in [-h, h] of a full turn
  c.grayscale_prob = 0.2                 # official AUG.GRAY_SCALE
  # Evaluation: 1 crop = resize short side to int(eval_resize_ratio *
  # image_size) and centre crop; 3 crops = resize short side to image_size
  # and take left/centre/right (top/centre/bottom) crops.
  c.eval_resize_ratio = 256 / 224
  # Normalisation of 0..255 pixels (ImageNet mean/std, as the released models).
  c.mean = (123.675, 116.28, 103.53)
  c.std = (58.395, 57.12, 57.375)

  # --- tf.data. ---------------------------------------------------------------
  c.shuffle_buffer_size = 512   # records (JPEG bytes) held for shuffling; part of iterator checkpoints
  c.cycle_length = 8            # shard files read at once
  c.num_threads = 0             # tf.data threads; 0 = one per CPU core
  c.prefetch_batches = 2
  c.checkpoint_iterator = True  # save/restore the train iterator state with the model
  # Log a line naming the shard for each bad record (they are always counted).
  c.log_skipped = True
  return c
