"""Official recipe: Video-FocalNet-Base on kinetics600 (configs/kinetics600/video-focalnet_base.yaml).

    python main.py train --config=configs/k600_base.py --workdir=DIR \
      --config.data.train_shards=SHARDS/train --config.data.eval_shards=SHARDS/val
"""
from vfocal_jax.configs import default


def get_config():
  config = default.official("kinetics600", "base", num_classes=600, drop_path_rate=0.5)
  return config
