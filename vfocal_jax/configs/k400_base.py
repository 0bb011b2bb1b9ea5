"""Official recipe: Video-FocalNet-Base on kinetics400 (configs/kinetics400/video-focalnet_base.yaml).

    python main.py train --config=configs/k400_base.py --workdir=DIR \
      --config.data.train_shards=SHARDS/train --config.data.eval_shards=SHARDS/val
"""
from vfocal_jax.configs import default


def get_config():
  config = default.official("kinetics400", "base", num_classes=400, drop_path_rate=0.5)
  return config
