"""Official recipe: Video-FocalNet-Small on kinetics400 (configs/kinetics400/video-focalnet_small.yaml).

    python main.py train --config=configs/k400_small.py --workdir=DIR \
      --config.data.train_shards=SHARDS/train --config.data.eval_shards=SHARDS/val
"""
from vfocal_jax.configs import default


def get_config():
  config = default.official("kinetics400", "small", num_classes=400, drop_path_rate=0.3)
  return config
