"""The demo (default config of main.py): a small Video-FocalNet on the synthetic motion dataset.

    python main.py --workdir=/tmp/demo                                        # parallel (default)
    python main.py --workdir=/tmp/demo_so --config.model.design=spatial_only \
        --config.model.tubelet_size=1                                         # cannot see motion

The 8 classes differ only in how a shape moves (data/demo_dataset.py), so a
model that cannot compare frames stays near chance (12.5%). The
``demo_dataset`` block is the switch: with it and no ``data.train_shards``,
``train`` writes the shards into ``<workdir>/demo_data`` (or
``demo_data_dir``) when absent (``vfocal_jax.data.demo_dataset.prepare``).

Tubelet 2: the stem is a 3-D conv over frame pairs, so the model sees motion
from its first layer and learns within a few hundred steps (98.5% top-1,
measured on the 2-core CPU). With tubelet 1 (as the released models) only the
temporal branch can compare frames; from scratch it sits at chance for ~2,000
steps and whether it leaves that plateau within 3,600 steps changed with
float32 round-off between runs (94.0% once, 14.0% once). spatial_only with
tubelet 1 stays at chance (9.0%); with tubelet 2 its stem sees motion too.
"""
import ml_collections

from vfocal_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.dataset = "demo"              # Informative, as in every config.
  config.demo_data_dir = ""            # '' = <workdir>/demo_data (~/.cache/vfocal_jax/demo_data for gs://).
  # oversample: film the same motion with k times the frames (16 k per video); frames_per_video:
  # make_shards --frames_per_video (keep that many, at segment centres; 0 = all). docs/data.md.
  config.demo_dataset = ml_collections.ConfigDict(dict(train_per_class=300, val_per_class=25, seed=0,
                                                       oversample=1, frames_per_video=0))

  config.num_frames = 8
  config.image_size = 32
  config.model.variant = "tiny"
  config.model.embed_dim = 24
  config.model.depths = (1, 1, 2, 1)
  config.model.num_classes = 8
  config.model.tubelet_size = 2
  config.model.dense_init = "fan_in"   # From scratch: the official std-0.02 init leaves the modulators dead.
  config.model.drop_path_rate = 0.0
  config.model.dtype = "float32"

  # Horizontal flips swap left/right and cw/ccw: off, as for Something-Something-v2.
  config.data.flip_prob = 0.0
  config.data.frame_interval = 1
  config.data.train_resize_ratio = 1.0
  config.data.rrc_area_range = (0.5, 1.0)
  config.data.color_jitter_prob = 0.0
  config.data.grayscale_prob = 0.0
  config.data.eval_resize_ratio = 1.0
  config.data.shuffle_buffer_size = 800

  config.batch_size = 32
  config.eval_batch_size = 32
  config.optimizer = "adamw"
  config.base_lr = 0.016               # x 32/512 -> 1e-3 peak.
  config.warmup_lr = 0.0
  config.min_lr = 0.0
  config.weight_decay = 0.05
  config.weight_decay_quirk = False
  config.num_epochs = 20               # 1,500 steps; chance is left after ~400.
  config.warmup_epochs = 1
  config.mixup_alpha = 0.0
  config.cutmix_alpha = 0.0
  config.eval_every_epochs = 0.0
  config.test_num_clips = 1
  config.test_num_crops = 1
  config.log_every_steps = 20
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 1
  return config
