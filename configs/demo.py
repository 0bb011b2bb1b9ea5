"""The demo (default config of main.py): a small Video-FocalNet on the synthetic motion dataset.

    python main.py --workdir=/tmp/demo                                        # parallel (default)
    python main.py --workdir=/tmp/demo_so --config.model.design=spatial_only  # no temporal branch

The 8 classes differ only in how a shape moves (data/demo_dataset.py), so a
model that cannot compare frames stays near chance (12.5%). main.py writes
the shards into ``<workdir>/demo_data`` (or ``demo_data_dir``) when absent.
Tubelet 1 (as the released models): the stem sees one frame, so only the
temporal branch can compare frames. A tubelet-2 stem (3-D conv over frame
pairs) would let spatial_only see motion too (it reached 96% that way).
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

  config.batch_size = 16
  config.eval_batch_size = 32
  config.optimizer = "adamw"
  config.base_lr = 0.032               # x 16/512 -> 1e-3 peak.
  config.warmup_lr = 0.0
  config.min_lr = 0.0
  config.weight_decay = 0.05
  config.weight_decay_quirk = False
  config.num_epochs = 24              # 3,600 steps: the temporal branch leaves chance after ~1,900.
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
