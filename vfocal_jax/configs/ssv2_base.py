"""Official recipe: Video-FocalNet-Base on ssv2 (configs/ssv2/video-focalnet_base.yaml).

    python main.py train --config=configs/ssv2_base.py --workdir=DIR \
      --config.data.train_shards=SHARDS/train --config.data.eval_shards=SHARDS/val
"""
from vfocal_jax.configs import default


def get_config():
  config = default.official("ssv2", "base", num_classes=174, drop_path_rate=0.5)
  config.data.flip_prob = 0.0  # AUG.FLIP_RATIO 0.0: direction is the label.
  return config
