"""The train step's loss and gradients with mixup / CutMix and label smoothing, against PyTorch float64.

``train.loss_and_grads`` returns the mixing it drew (``MixInfo``: partner rows, ``lam``, CutMix or mixup,
the box). From those alone the reference blends the normalised clips in NumPy, builds the smoothed soft
targets (off ``eps / K``, on ``1 - eps + eps / K``, mixed by ``lam``), runs the PyTorch reference model
(benchmarks/torch_video_focalnet.py, same weights) in float64 and takes the soft-target cross-entropy and
its gradient with autograd. A step that mixes something other than what it reports, ignores the soft
targets or the smoothing, or averages differently, moves the loss or the gradients.
"""
import jax
import numpy as np
import pytest
import torch

from benchmarks import torch_video_focalnet as tvf  # The repository root is on sys.path (conftest).
from helpers import NUM_CLASSES, global_batch, tiny_config
from reference_views import normalised
from vfocal_jax import artifacts, sharding, train
from vfocal_jax.convert.mapping import flax_to_torch_state_dict, torch_to_flax

ARCH = dict(embed_dim=8, depths=(1, 1), focal_levels=(1, 1), num_classes=NUM_CLASSES)
GRAD_TOL = 1e-4  # Of each parameter's largest gradient element: float32 against float64.


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(smoothing):
  model = {f"model.{k}": v for k, v in ARCH.items()}
  return tiny_config(num_frames=2, label_smoothing=smoothing, mixup_alpha=0.8, cutmix_alpha=1.0,
                     mixup_switch_prob=0.5, **{"model.drop_path_rate": 0.0, **model})


def _reference(torch_model, batch, mix, smoothing):
  """Loss, top-1 and gradients (torch layout) of the batch blended as ``mix`` says, float64.

  ``mix`` covers S data shards of B/S consecutive rows, each with its own ``lam``, kind and box.
  """
  x = normalised(batch)
  perm = np.asarray(mix.perm)
  rows = len(x) // len(mix.lam)  # Rows of one shard.
  lam = np.repeat(np.asarray(mix.lam, np.float64), rows)
  cutmix = np.repeat(np.asarray(mix.cutmix), rows)
  box = np.repeat(np.asarray(mix.box_mask), rows, axis=0)[:, None, :, :, None]
  assert all(i // rows == j // rows for i, j in enumerate(perm))  # Partners from the same shard.
  np.testing.assert_allclose(lam[cutmix], 1 - box[cutmix].mean((1, 2, 3, 4)), rtol=1e-6)  # The box's true area.
  per_row = lambda v: v[:, None, None, None, None]
  blended = np.where(per_row(cutmix), np.where(box, x[perm], x), per_row(lam) * x + per_row(1 - lam) * x[perm])
  one_hot = np.eye(NUM_CLASSES)[batch["label"]]
  soft = one_hot * (1 - smoothing) + smoothing / NUM_CLASSES
  targets = lam[:, None] * soft + (1 - lam[:, None]) * soft[perm]

  torch_model.zero_grad()
  logits = torch_model(torch.from_numpy(blended).permute(0, 1, 4, 2, 3))
  loss = -(torch.from_numpy(targets) * torch.log_softmax(logits, -1)).sum(-1).mean()
  loss.backward()
  top1 = float(np.mean(logits.detach().numpy().argmax(-1) == batch["label"]))
  return loss.item(), top1, {k: p.grad.numpy() for k, p in torch_model.named_parameters()}


@pytest.fixture(scope="module")
def models():
  torch.manual_seed(0)
  ref = tvf.randomize_(tvf.VideoFocalNet(num_frames=2, tubelet_size=1, drop_path_rate=0.0, **ARCH), seed=0)
  with torch.no_grad():  # Confident logits (a loss far from log K): a wrong target moves the loss more.
    ref.head.weight.mul_(10.0)
  model = artifacts.build_model(_config(0.1))
  params = torch_to_flax({k: v.detach().numpy() for k, v in ref.state_dict().items()}, model)["params"]
  return ref.double().train(), model, params


def _draws(config, model, params, kinds):
  """``loss_and_grads`` (compiled once) on test batches until each kind ('mixup', 'cutmix') was drawn."""
  step = jax.jit(lambda p, b, rng: train.loss_and_grads(model, p, b["video"], b["pixel_affine"], b["label"], rng,
                                                         config, NUM_CLASSES))
  found = {}
  for i in range(20):
    batch = global_batch(i, config)
    loss, top1, grads, mix = step(params, batch, jax.random.PRNGKey(i))
    kind = "cutmix" if bool(mix.cutmix[0]) else "mixup"
    if kind in kinds and kind not in found:
      assert 0 < float(mix.lam[0]) < 1 and sorted(np.asarray(mix.perm)) == list(range(len(batch["label"])))
      found[kind] = batch, (float(loss), float(top1), jax.device_get(grads), jax.device_get(mix))
    if len(found) == len(kinds):
      return found
  raise AssertionError(f"not every kind of {kinds} drawn in 20 steps: {list(found)}")


def _check(torch_model, model, batch, got, smoothing):
  loss, top1, grads, mix = got
  ref_loss, ref_top1, ref_grads = _reference(torch_model, batch, mix, smoothing)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert top1 == ref_top1
  grads = flax_to_torch_state_dict({"params": grads}, model)
  assert grads.keys() == ref_grads.keys()
  for key, ref in ref_grads.items():
    np.testing.assert_allclose(grads[key], ref, rtol=0, atol=GRAD_TOL * np.abs(ref).max(), err_msg=key)
  return ref_grads


@pytest.fixture(scope="module")
def smoothed(models):
  _, model, params = models
  return _draws(_config(0.1), model, params, ("mixup", "cutmix"))


def test_loss_and_gradients_with_mixup_cutmix_and_smoothing_match_torch(models, smoothed):
  torch_model, model, _ = models
  for kind, (batch, got) in smoothed.items():
    ref_grads = _check(torch_model, model, batch, got, 0.1)
    # The check can tell smoothing from none: without it the reference gradients move by far more than the
    # tolerance. (The loss moves less: for a random model the target's log-probability is about the mean one.)
    unsmoothed = _reference(torch_model, batch, got[3], 0.0)[2]
    moved = max(np.abs(unsmoothed[k] - g).max() / np.abs(g).max() for k, g in ref_grads.items())
    assert moved > 100 * GRAD_TOL, (kind, moved)


def test_smoothing_off_matches_the_formula_without_it(models, smoothed):
  torch_model, model, params = models
  (batch, got), = _draws(_config(0.0), model, params, ("mixup",)).values()
  _check(torch_model, model, batch, got, 0.0)
  # The same batch and mixing as the smoothed step's (the mixing key does not depend on the smoothing): the two
  # steps' gradients differ.
  smoothed_batch, smoothed_got = smoothed["mixup"]
  np.testing.assert_array_equal(batch["video"], smoothed_batch["video"])
  assert got[3].lam == smoothed_got[3].lam and (got[3].perm == smoothed_got[3].perm).all()
  g, g_smoothed = got[2]["head"]["kernel"], smoothed_got[2]["head"]["kernel"]
  assert np.abs(g - g_smoothed).max() > 100 * GRAD_TOL * np.abs(g_smoothed).max()


def test_mixing_per_data_shard_matches_torch(models):
  """On a (2, 1) mesh each data shard of 4 clips draws its own mixing (mixup.mix_per_shard): still the same loss."""
  torch_model, model, params = models
  config = _config(0.1)
  mesh = sharding.create_mesh((2, 1), jax.devices()[:2])
  rows, replicated = jax.NamedSharding(mesh, jax.P(sharding.DATA)), jax.NamedSharding(mesh, jax.P())
  step = jax.jit(lambda p, b, rng: train.loss_and_grads(model, p, b["video"], b["pixel_affine"], b["label"], rng,
                                                         config, NUM_CLASSES, mesh=mesh, batch_spec=(sharding.DATA,)),
                 in_shardings=(replicated, rows, replicated))
  batch = global_batch(0, config)
  with mesh:
    loss, top1, grads, mix = jax.device_get(step(params, batch, jax.random.PRNGKey(3)))
  assert len(mix.lam) == 2 and mix.lam[0] != mix.lam[1]
  _check(torch_model, model, batch, (float(loss), float(top1), grads, mix), 0.1)
