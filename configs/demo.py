"""The demo (default config of main.py): a small Video-FocalNet on the synthetic motion dataset.

    python main.py --workdir=/tmp/demo                                        # parallel (default)
    python main.py --workdir=/tmp/demo_so --config.model.design=spatial_only  # no temporal branch

The 8 classes differ only in how a shape moves (data/demo_dataset.py), so a
model that cannot compare frames stays near chance (12.5%). main.py writes
the shards into ``<workdir>/demo_data`` (or ``demo_data_dir``) when absent.
Measured on the 2-core CPU: 96.5% top-1 in 5m49s, shards included.

Caveat: the tubelet stem (2 frames) sees short-range motion by itself, so
spatial_only reaches 96% here too. With ``tubelet_size=1`` (the baseline that
cannot compare frames) the parallel model also stayed at chance after
1,500 steps: its temporal branch needs a longer schedule from scratch.
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.dataset = "demo"
  config.demo_data_dir = ""            # '' = <workdir>/demo_data.
  config.demo_dataset = ml_collections.ConfigDict(dict(train_per_class=300, val_per_class=25, seed=0))

  config.num_frames = 8
  config.image_size = 32
  config.model.variant = "tiny"
  config.model.embed_dim = 24
  config.model.depths = (1, 1, 2, 1)
  config.model.num_classes = 8
  config.model.tubelet_size = 2         # A tubelet stem sees frame pairs; with 1, 1,500 steps stay at chance.
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
  config.num_epochs = 20
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
