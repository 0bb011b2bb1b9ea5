"""Multi-view evaluation: exact counts with padding, against a NumPy float64 reference.

The "model" here reads its logits out of the clip's pixels, so every view's
logits are known in advance and the reference needs no model at all.
"""
import json

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from vfocal_jax import evaluate, sharding

K = 7


class PixelLogits(nn.Module):
  """Logits = the first K values of each clip (a stand-in with known outputs)."""

  @nn.compact
  def __call__(self, video, train=False):
    return video.reshape(video.shape[0], -1)[:, :K]


def _batches(num_videos, batch, views, rng):
  out = []
  for start in range(0, num_videos, batch):
    n = min(batch, num_videos - start)
    video = rng.normal(size=(batch, views, 2, 4, 4, 3)).astype(np.float32) * 3
    label = rng.integers(0, K, batch).astype(np.int32)
    label[n:] = rng.integers(0, K, batch - n)  # padding rows carry junk labels
    out.append({"video": video, "label": label, "mask": np.arange(batch) < n})
  return out


def _reference(batches):
  c1 = c5 = n = 0
  per_class = np.zeros((K, 2), np.int64)
  confusion = np.zeros((K, K), np.int64)
  for b in batches:
    logits = b["video"].reshape(b["video"].shape[:2] + (-1,))[..., :K].astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).sum(1)
    order = np.argsort(-p, axis=-1)
    for i in np.flatnonzero(b["mask"]):
      y = b["label"][i]
      n += 1
      c1 += order[i, 0] == y
      c5 += y in order[i, :5]
      per_class[y] += (order[i, 0] == y, 1)
      confusion[y, order[i, 0]] += 1
  return n, c1, c5, per_class, confusion


def test_eval_counts_exact_with_padding():
  rng = np.random.default_rng(0)
  batches = _batches(num_videos=29, batch=8, views=3, rng=rng)  # last batch: 5 real + 3 padding
  n, c1, c5, per_class, confusion = _reference(batches)
  config = ml_collections.ConfigDict(dict(model=dict(num_classes=K), data=dict(eval_clip_offsets="uniform")))
  for shape in [(1, 1), (4, 2)]:
    mesh = sharding.create_mesh(shape, jax.devices()[:shape[0] * shape[1]])
    params = jax.device_put({}, sharding.replicated(mesh))
    res = evaluate.evaluate_params(config, PixelLogits(), params, mesh, num_clips=3, num_crops=1, batches=batches,
                                   class_names=[str(k) for k in range(K)])
    assert res["num_videos"] == n == 29
    assert res["num_correct_top1"] == c1
    assert res["num_correct_top5"] == c5
    np.testing.assert_allclose(res["top1"], 100.0 * c1 / n)
    for k in range(K):
      if per_class[k, 1]:
        np.testing.assert_allclose(res["per_class_top1"][str(k)], 100.0 * per_class[k, 0] / per_class[k, 1])
    np.testing.assert_array_equal(res["confusion"], confusion)


def test_write_results_draws_the_confusion_matrix(tmp_path):
  confusion = [[3, 1], [0, 4]]
  evaluate.write_results(str(tmp_path), {"top1": 87.5, "confusion": confusion, "class_names": ["a", "b"]})
  assert json.load(open(tmp_path / evaluate.RESULTS_FILE))["confusion"] == confusion
  assert (tmp_path / evaluate.CONFUSION_PNG).stat().st_size > 1000
