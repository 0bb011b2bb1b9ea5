"""Params and MACs of the summary against hand counts and the published figures."""
import pytest

from vfocal_jax import summary


def taps(n: int, k: int, padded: bool) -> int:
  """(output position, kernel tap) pairs of a stride-1 'same' convolution of size k along n positions;
  padded=False counts only the taps that land inside the input."""
  if padded:
    return n * k
  pad = (k - 1) // 2
  return sum(1 for i in range(n) for j in range(k) if 0 <= i - pad + j < n)


def hand_macs(embed_dim, depths, focal_levels, focal_windows, num_frames, image_size,
              tubelet_size, num_classes, mlp_ratio=4.0, patch_size=4, padded_taps=True):
  """Multiply-accumulates of one view, from the architecture (docs/design.md), not the code.

  Per token of a stage with C channels and focal kernels k_l = 2 l + w:
  f: C(2C+L+1); depthwise k_l x k_l: C k_l^2 each; h: C^2; f_temporal: C(C+L+1);
  dense temporal conv k_l: C^2 k_l each; h_temporal: C^2; proj: C^2; MLP: 2 C (r C).
  Convolutions count all kernel taps (zero padding included), as thop/fvcore; with
  padded_taps=False only the taps inside the input, as XLA's cost analysis counts them.
  """
  frames = num_frames // tubelet_size
  side, c = image_size // patch_size, embed_dim
  total = frames * side * side * c * (3 * patch_size * patch_size * tubelet_size)  # stem
  for i, depth in enumerate(depths):
    lvl = focal_levels[i]
    ks = [2 * l + focal_windows[i] for l in range(lvl)]
    per_token = (c * (2 * c + lvl + 1) + c * c + c * (c + lvl + 1) + c * c + c * c
                 + 2 * int(mlp_ratio * c) * c)
    convs = sum(frames * taps(side, k, padded_taps) ** 2 * c                 # depthwise k x k
                + side * side * taps(frames, k, padded_taps) * c * c for k in ks)  # dense temporal k
    total += depth * (frames * side * side * per_token + convs)
    if i < len(depths) - 1:  # downsample: 2x2 conv, C -> 2C
      total += frames * (side // 2) ** 2 * (2 * c) * (c * 4)
      side, c = side // 2, 2 * c
  return total + c * num_classes  # head (after pooling)


@pytest.mark.parametrize("tubelet", [1, 2])
def test_tiny_config_macs_match_hand_count(tubelet):
  cfg = dict(variant="custom", embed_dim=8, depths=(1, 1, 2, 1), focal_levels=(2, 2, 3, 1),
             focal_windows=(3, 3, 1, 5), num_frames=4, tubelet_size=tubelet, num_classes=5)
  s = summary.summarize(cfg, num_frames=4, image_size=64)
  want = hand_macs(8, (1, 1, 2, 1), (2, 2, 3, 1), (3, 3, 1, 5), 4, 64, tubelet, 5)
  assert s["macs"] == want


def test_xla_cost_analysis_is_reported_for_a_tiny_model():
  """XLA's flops: 2 per multiply-accumulate of the dots and convolutions (taps inside the input only), plus the
  element-wise work (LayerNorms, the erf GELU of 4C hidden features, the gates: < 256 flops per block activation)."""
  arch = dict(embed_dim=8, depths=(1, 1, 1, 1), focal_levels=(2, 2, 2, 2), focal_windows=(3, 3, 3, 3))
  cfg = dict(variant="custom", num_frames=2, num_classes=3, **arch)
  s = summary.summarize(cfg, num_frames=2, image_size=32, with_xla=True)
  assert isinstance(s["xla_gflops"], float), s
  products = 2 * hand_macs(*arch.values(), 2, 32, 1, 3, padded_taps=False)
  activations = sum(2 * (8 // 2 ** i) ** 2 * 8 * 2 ** i for i in range(4))   # frames x H x W x C of each block
  assert products < s["xla_gflops"] * 1e9 < products + 256 * activations, (s, products, activations)


@pytest.mark.parametrize("variant,params,gmacs", [
    ("tiny", 49_553_272, 63.1), ("small", 88_735_168, 124.5), ("base", 157_389_216, 220.9)])
def test_published_params_and_gmacs(variant, params, gmacs):
  s = summary.summarize({"variant": variant, "num_classes": 400}, num_frames=8, image_size=224)
  assert s["params"] == params
  assert abs(s["gmacs"] - gmacs) / gmacs < 0.02
  # The released get_flops.py (thop) adds LayerNorms and the pool: it matches to 0.1%.
  assert abs(s["thop_gmacs"] - gmacs) / gmacs < 0.001
