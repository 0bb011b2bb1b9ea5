"""Every recipe loads, matches the released hyper-parameters, and rejects misspelt / ill-typed overrides."""
import glob
import os

import pytest
from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "vfocal_jax", "configs", "*.py"))
                 if os.path.basename(p) not in ("__init__.py", "data.py"))  # data.py: config.data's fields only.

# (file, variant, classes, drop_path, flip) from configs/<dataset>/video-focalnet_<size>.yaml of the release.
OFFICIAL = [("k400_tiny", "tiny", 400, 0.2, 0.5), ("k400_small", "small", 400, 0.3, 0.5),
            ("k400_base", "base", 400, 0.5, 0.5), ("k600_base", "base", 600, 0.5, 0.5),
            ("ssv2_base", "base", 174, 0.5, 0.0), ("diving48_base", "base", 48, 0.5, 0.5),
            ("activitynet_base", "base", 200, 0.5, 0.5)]


def _parse(path, *overrides):
  argv = ["prog", f"--config={path}", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", path, flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


@pytest.mark.parametrize("name,variant,classes,drop_path,flip", OFFICIAL)
def test_official_recipes(name, variant, classes, drop_path, flip):
  c = _parse(os.path.join(ROOT, "configs", f"{name}.py"))
  assert (c.model.variant, c.model.num_classes, c.model.drop_path_rate, c.data.flip_prob) == (
      variant, classes, drop_path, flip)
  assert c.data.num_classes == classes
  assert (c.optimizer, c.momentum, c.nesterov, c.base_lr, c.warmup_lr, c.min_lr) == ("sgd", 0.9, True, 0.1, 1e-3, 1e-3)
  assert (c.num_epochs, c.warmup_epochs, c.grad_clip_norm, c.weight_decay) == (120, 20, 5.0, 1e-4)
  assert (c.mixup_alpha, c.cutmix_alpha, c.mixup_switch_prob, c.label_smoothing) == (0.8, 1.0, 0.5, 0.1)
  assert c.weight_decay_quirk and c.data.eval_clip_offsets == "uniform"
  assert (c.num_frames, c.model.num_frames, c.test_num_clips, c.test_num_crops) == (8, 8, 4, 3)
  assert (c.data.frame_interval, c.data.color_jitter_prob, c.data.grayscale_prob) == (4, 0.8, 0.2)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_loads_and_overrides(path):
  c = _parse(path, "--config.num_frames=16", "--config.mesh_shape=(2,4)")
  assert c.model.num_frames == 16 and tuple(c.mesh_shape) == (2, 4)


def test_architecture_fields_override_the_variant():
  from vfocal_jax import artifacts
  c = _parse(os.path.join(ROOT, "configs", "k400_base.py"), "--config.model.focal_levels=(1,1,1,1)")
  model = artifacts.build_model(c)
  assert (model.embed_dim, tuple(model.depths), tuple(model.focal_levels)) == (128, (2, 2, 18, 2), (1, 1, 1, 1))


def test_misspelt_or_ill_typed_field_names_the_field():
  path = os.path.join(ROOT, "configs", "demo.py")
  with pytest.raises(Exception, match="bacth_size"):
    _parse(path, "--config.bacth_size=8")
  with pytest.raises(Exception, match="batch_size"):
    _parse(path, "--config.batch_size=eight")
  with pytest.raises(Exception, match="drop_pth_rate"):
    _parse(path, "--config.model.drop_pth_rate=0.1")
