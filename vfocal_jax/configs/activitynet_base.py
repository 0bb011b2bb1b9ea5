"""Official recipe: Video-FocalNet-Base on activitynet (configs/activitynet/video-focalnet_base.yaml).

    python main.py train --config=configs/activitynet_base.py --workdir=DIR \
      --config.data.train_shards=SHARDS/train --config.data.eval_shards=SHARDS/val
"""
from vfocal_jax.configs import default


def get_config():
  config = default.official("activitynet", "base", num_classes=200, drop_path_rate=0.5)
  return config
