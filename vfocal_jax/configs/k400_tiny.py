"""Official recipe: Video-FocalNet-Tiny on kinetics400 (configs/kinetics400/video-focalnet_tiny.yaml).

    python main.py train --config=configs/k400_tiny.py --workdir=DIR \
      --config.data.train_shards=SHARDS/train --config.data.eval_shards=SHARDS/val
"""
from vfocal_jax.configs import default


def get_config():
  config = default.official("kinetics400", "tiny", num_classes=400, drop_path_rate=0.2)
  return config
