"""Fields shared by every config, with the official Kinetics-400 recipe as defaults.

Each recipe file (``configs/k400_tiny.py`` ...) calls :func:`get_config` and
changes what differs. Fields are typed and the config is locked by main.py, so
``--config.bacth_size=8`` (unknown field) or ``--config.batch_size=eight``
(wrong type) is an error that names the field.

Sources: the released ``configs/<dataset>/video-focalnet_<size>.yaml`` and
``config.py`` / ``main.py`` / ``lr_scheduler.py`` of TalalWasim/Video-FocalNets.

Two quirks of the released recipe, reproduced knowingly:

* ``weight_decay_quirk=True``: the released optimizer builder puts every
  parameter into the no-weight-decay group, so the configured 1e-4 is never
  applied. Set it to False to apply ``weight_decay`` to kernels (not biases,
  norms or layer-scale gammas).
* ``data.eval_clip_offsets``: the released multi-clip test sampler draws each
  clip's temporal offset at random, so its 4x3 numbers move by a few tenths
  between runs. The default here is the deterministic protocol (evenly
  spaced clips); ``'random'`` reproduces the released one.
"""
from __future__ import annotations

import ml_collections

from vfocal_jax.configs import data


def data_defaults() -> ml_collections.ConfigDict:
  """Every ``config.data`` field with its default (``configs/data.py``)."""
  return data.get_config()


def get_config() -> ml_collections.ConfigDict:
  """Official Kinetics-400 / Video-FocalNet-T recipe (4 GPUs x 8 clips)."""
  config = ml_collections.ConfigDict()
  config.dataset = "kinetics400"     # Informative name (logs, config.json); switches nothing.
  config.seed = 0

  # Clips.
  config.num_frames = 8             # DATA.NUM_FRAMES (after sampling; tubelet 1).
  config.image_size = 224           # DATA.INPUT_SIZE.

  # Model: `create_model(**config.model)`; variant + VideoFocalNet field overrides.
  config.model = ml_collections.ConfigDict()
  config.model.variant = "tiny"
  # None: the variant's value (T/S/B: docs/design.md); set any to build another architecture.
  config.model.embed_dim = ml_collections.FieldReference(None, field_type=int)
  config.model.depths = ml_collections.FieldReference(None, field_type=tuple)
  config.model.focal_levels = ml_collections.FieldReference(None, field_type=tuple)
  config.model.focal_windows = ml_collections.FieldReference(None, field_type=tuple)
  config.model.num_classes = 400
  config.model.num_frames = config.get_ref("num_frames")
  config.model.drop_path_rate = 0.2    # T 0.2 / S 0.3 / B 0.5.
  config.model.design = "parallel"     # | spatial_only | sequential | joint3d (paper's design space).
  config.model.tubelet_size = 1        # Frames per stem patch (released models: 1).
  config.model.dtype = "bfloat16"      # Compute dtype (the recipe used AMP O1); params stay float32.
  config.model.remat = False           # Rematerialise blocks (TRAIN.USE_CHECKPOINT).
  config.model.remat_policy = "nothing"  # With remat: what a block keeps for its backward: nothing | dots |
  #                                      dots_no_batch | modulators | everything (docs/traffic_cuts.md).
  config.model.layer_norm_impl = "flax"     # flax | recompute: same forward, a VJP that keeps only the input.
  config.model.focal_projection = "fused"  # fused | split | split_spatial: a matmul per group, gates as reductions.
  config.model.dense_init = "official"  # Linear init: official trunc_normal(0.02) | fan_in (from scratch; docs/training.md).

  # Input pipeline (every field documented in configs/data.py).
  config.data = data_defaults()
  config.data.num_classes = config.model.get_ref("num_classes")
  config.data.frame_interval = 4       # AUG.FRAME_INTERVAL.
  config.data.flip_prob = 0.5          # AUG.FLIP_RATIO (0 for Something-Something-v2).
  config.data.color_jitter_prob = 0.8  # AUG.COLOR_JITTER.
  config.data.grayscale_prob = 0.2     # AUG.GRAY_SCALE.
  config.data.eval_clip_offsets = "uniform"  # Deterministic; 'random' = the released test sampler.

  # Batch and optimisation (TRAIN.*).
  config.batch_size = 32               # Global clips per micro-step (8 per GPU x 4 GPUs in the scripts).
  config.accumulation_steps = 1        # Micro-steps per optimizer update (TRAIN.ACCUMULATION_STEPS).
  config.optimizer = "sgd"             # sgd (Nesterov) | adamw.
  config.momentum = 0.9
  config.nesterov = True
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.adam_eps = 1e-8
  config.base_lr = 0.1                 # Scaled by batch_size * accumulation_steps / 512 (lr_scaling).
  config.warmup_lr = 1e-3
  config.min_lr = 1e-3
  config.lr_scaling = True
  config.num_epochs = 120
  config.warmup_epochs = 20
  config.num_train_steps = -1          # > 0: overrides num_epochs (then warmup_steps >= 0 overrides warmup_epochs).
  config.warmup_steps = -1
  config.num_train_examples = -1       # > 0: train split size; else counted by the input pipeline.
  config.weight_decay = 1e-4
  config.weight_decay_quirk = True     # Released code never applies weight decay (see module doc).
  config.grad_clip_norm = 5.0          # TRAIN.CLIP_GRAD.

  # Mixup / CutMix / label smoothing (AUG.*), on the device in the train step.
  config.label_smoothing = 0.1         # AUG.LABEL_SMOOTH.
  config.mixup_alpha = 0.8             # AUG.MIXUP; 0 turns mixup off.
  config.cutmix_alpha = 1.0            # AUG.CUTMIX; 0 turns CutMix off.
  config.mixup_switch_prob = 0.5       # AUG.MIXUP_SWITCH_PROB: CutMix instead of mixup.

  # Parallelism: one Mesh(('data', 'model')); -1 = the rest of the devices.
  config.mesh_shape = (-1, 1)
  config.fsdp = False                  # Also shard params / optimizer state over 'data'.
  config.fsdp_min_size = 2 ** 14       # Smaller arrays stay replicated under FSDP.

  # Evaluation: during training 1 clip x 1 crop (as the released code), final test 4 x 3.
  config.eval_batch_size = 32          # Global videos per eval step (each with all its views).
  config.eval_every_epochs = 1.0       # 0: only the final test.
  config.eval_num_clips = 1
  config.eval_num_crops = 1
  config.test_num_clips = 4
  config.test_num_crops = 3

  # Checkpoints and logs.
  config.init_checkpoint = ""          # Converted checkpoint to start from (e.g. ImageNet FocalNet-SRF, inflated).
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  config.keep_best_checkpoints = 1
  config.async_checkpointing = True
  return config


def official(dataset: str, variant: str, num_classes: int, drop_path_rate: float) -> ml_collections.ConfigDict:
  """A released recipe: dataset + model size (everything else is shared)."""
  config = get_config()
  config.dataset = dataset
  config.model.variant = variant
  config.model.num_classes = num_classes
  config.model.drop_path_rate = drop_path_rate
  config.init_checkpoint = ""  # TRAIN.PRETRAINED_PATH: ./pretrained/focalnet_<size>_srf.pth, converted with
  #                              `main.py convert --imagenet` then passed as --checkpoint or here.
  return config
