"""Official recipe: Video-FocalNet-Base on diving48 (configs/diving48/video-focalnet_base.yaml).

    python main.py train --config=configs/diving48_base.py --workdir=DIR \
      --config.data.train_shards=SHARDS/train --config.data.eval_shards=SHARDS/val
"""
from vfocal_jax.configs import default


def get_config():
  config = default.official("diving48", "base", num_classes=48, drop_path_rate=0.5)
  # The yaml sets no MODEL.LABEL_SMOOTHING, but the mixup targets use AUG.LABEL_SMOOTH = 0.1 anyway.
  return config
