"""A PyTorch Video-FocalNet with the official state-dict keys (reference only).

Written from the released code (TalalWasim/Video-FocalNets,
`classification/videofocalnet.py`, the "parallel" spatio-temporal focal
modulation) without its timm/torchvision imports, so that tests and
benchmarks can (a) write real `.pth` files in the released layout and (b)
compare our Flax model against an independent implementation.

Module attribute names, and therefore `state_dict()` keys, are the official
ones (`patch_embed.proj.weight`, `layers.0.blocks.1.modulation.f.weight`,
`layers.2.downsample.norm.bias`, `norm.weight`, `head.weight`, ...).

Input: `(B, T, 3, H, W)` as in the official model. Never imported by the
library.
"""
from __future__ import annotations

import torch
from torch import nn


class DropPath(nn.Module):
  """Stochastic depth per sample (row of `B*T'`), as timm's DropPath."""

  def __init__(self, drop_prob: float = 0.0):
    super().__init__()
    self.drop_prob = drop_prob

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.drop_prob == 0.0 or not self.training:
      return x
    keep = 1.0 - self.drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class Mlp(nn.Module):

  def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
    super().__init__()
    self.fc1 = nn.Linear(in_features, hidden_features)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden_features, in_features)
    self.drop = nn.Dropout(drop)

  def forward(self, x):
    return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SpatioTemporalFocalModulation(nn.Module):
  """The released parallel spatial + (dense) temporal focal modulation."""

  def __init__(self, dim, focal_window, focal_level, focal_factor=2, bias=True, proj_drop=0.0,
               use_postln_in_modulation=False, normalize_modulator=False, num_frames=8):
    super().__init__()
    self.dim = dim
    self.focal_level = focal_level
    self.use_postln_in_modulation = use_postln_in_modulation
    self.normalize_modulator = normalize_modulator
    self.num_frames = num_frames

    self.f = nn.Linear(dim, 2 * dim + (focal_level + 1), bias=bias)
    self.h = nn.Conv2d(dim, dim, kernel_size=1, stride=1, bias=bias)
    self.act = nn.GELU()
    self.proj = nn.Linear(dim, dim)
    self.proj_drop = nn.Dropout(proj_drop)
    self.focal_layers = nn.ModuleList()
    self.f_temporal = nn.Linear(dim, dim + (focal_level + 1), bias=bias)
    self.h_temporal = nn.Conv1d(dim, dim, kernel_size=1, stride=1, bias=bias)
    self.focal_layers_temporal = nn.ModuleList()
    for k in range(focal_level):
      ks = focal_factor * k + focal_window
      self.focal_layers.append(nn.Sequential(
          nn.Conv2d(dim, dim, kernel_size=ks, stride=1, groups=dim, padding=ks // 2, bias=False), nn.GELU()))
    for k in range(focal_level):
      ks = focal_factor * k + focal_window
      self.focal_layers_temporal.append(nn.Sequential(
          nn.Conv1d(dim, dim, kernel_size=ks, stride=1, padding=ks // 2, bias=False), nn.GELU()))
    if use_postln_in_modulation:
      self.ln = nn.LayerNorm(dim)

  def forward(self, x):
    """x: (B*T, H, W, C) -> (B*T, H, W, C)."""
    bt, h, w, c = x.shape
    t = self.num_frames
    b = bt // t
    lvl = self.focal_level

    # Temporal branch: '(b t) h w c -> (b h w) t c'.
    xt = x.reshape(b, t, h, w, c).permute(0, 2, 3, 1, 4).reshape(b * h * w, t, c)
    xt = self.f_temporal(xt).permute(0, 2, 1).contiguous()
    ctx_t, gates_t = torch.split(xt, (c, lvl + 1), 1)
    ctx_all_t = 0
    for l in range(lvl):
      ctx_t = self.focal_layers_temporal[l](ctx_t)
      ctx_all_t = ctx_all_t + ctx_t * gates_t[:, l:l + 1]
    ctx_global_t = self.act(ctx_t.mean(2, keepdim=True))
    ctx_all_t = ctx_all_t + ctx_global_t * gates_t[:, lvl:]

    # Spatial branch.
    xs = self.f(x).permute(0, 3, 1, 2).contiguous()
    q, ctx, gates = torch.split(xs, (c, c, lvl + 1), 1)
    ctx_all = 0
    for l in range(lvl):
      ctx = self.focal_layers[l](ctx)
      ctx_all = ctx_all + ctx * gates[:, l:l + 1]
    ctx_global = self.act(ctx.mean(2, keepdim=True).mean(3, keepdim=True))
    ctx_all = ctx_all + ctx_global * gates[:, lvl:]

    if self.normalize_modulator:
      ctx_all_t = ctx_all_t / (lvl + 1)
      ctx_all = ctx_all / (lvl + 1)

    mod_t = self.h_temporal(ctx_all_t)  # (b h w) c t
    mod_t = mod_t.reshape(b, h, w, c, t).permute(0, 4, 3, 1, 2).reshape(bt, c, h, w)
    mod = self.h(ctx_all)
    out = (q * mod * mod_t).permute(0, 2, 3, 1).contiguous()
    if self.use_postln_in_modulation:
      out = self.ln(out)
    return self.proj_drop(self.proj(out))


class VideoFocalNetBlock(nn.Module):

  def __init__(self, dim, mlp_ratio=4.0, drop=0.0, drop_path=0.0, focal_level=1, focal_window=3,
               use_layerscale=False, layerscale_value=1e-4, use_postln=False,
               use_postln_in_modulation=False, normalize_modulator=False, num_frames=8):
    super().__init__()
    self.use_postln = use_postln
    self.norm1 = nn.LayerNorm(dim)
    self.modulation = SpatioTemporalFocalModulation(
        dim, proj_drop=drop, focal_window=focal_window, focal_level=focal_level,
        use_postln_in_modulation=use_postln_in_modulation, normalize_modulator=normalize_modulator,
        num_frames=num_frames)
    self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
    self.norm2 = nn.LayerNorm(dim)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
    self.gamma_1 = 1.0
    self.gamma_2 = 1.0
    if use_layerscale:
      self.gamma_1 = nn.Parameter(layerscale_value * torch.ones(dim))
      self.gamma_2 = nn.Parameter(layerscale_value * torch.ones(dim))
    self.H = None
    self.W = None

  def forward(self, x):
    h, w = self.H, self.W
    b, l, c = x.shape
    shortcut = x
    x = x if self.use_postln else self.norm1(x)
    x = self.modulation(x.view(b, h, w, c)).view(b, h * w, c)
    x = x if not self.use_postln else self.norm1(x)
    x = shortcut + self.drop_path(self.gamma_1 * x)
    if self.use_postln:
      x = x + self.drop_path(self.gamma_2 * self.norm2(self.mlp(x)))
    else:
      x = x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))
    return x


class PatchEmbed(nn.Module):

  def __init__(self, patch_size=4, in_chans=3, embed_dim=96, use_conv_embed=False, norm_layer=True,
               is_stem=False, tubelet_size=1):
    super().__init__()
    self.tubelet_size = tubelet_size
    if use_conv_embed:
      kernel, padding, stride = (7, 2, 4) if is_stem else (3, 1, 2)
      self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel, stride=stride, padding=padding)
    elif tubelet_size == 1:
      self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
    else:
      self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=(tubelet_size, patch_size, patch_size),
                            stride=(tubelet_size, patch_size, patch_size))
    self.norm = nn.LayerNorm(embed_dim) if norm_layer else None

  def forward(self, x):
    if self.tubelet_size == 1:
      x = self.proj(x)
    else:
      x = self.proj(x.permute(0, 2, 1, 3, 4))  # B C T H W
      b, c, t, h, w = x.shape
      x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    h, w = x.shape[2:]
    x = x.flatten(2).transpose(1, 2)
    if self.norm is not None:
      x = self.norm(x)
    return x, h, w


class BasicLayer(nn.Module):

  def __init__(self, dim, out_dim, depth, mlp_ratio=4.0, drop=0.0, drop_path=(), downsample=False,
               focal_level=1, focal_window=1, use_conv_embed=False, use_layerscale=False,
               layerscale_value=1e-4, use_postln=False, use_postln_in_modulation=False,
               normalize_modulator=False, num_frames=8):
    super().__init__()
    self.blocks = nn.ModuleList([
        VideoFocalNetBlock(dim, mlp_ratio=mlp_ratio, drop=drop, drop_path=drop_path[i],
                           focal_level=focal_level, focal_window=focal_window,
                           use_layerscale=use_layerscale, layerscale_value=layerscale_value,
                           use_postln=use_postln, use_postln_in_modulation=use_postln_in_modulation,
                           normalize_modulator=normalize_modulator, num_frames=num_frames)
        for i in range(depth)])
    self.downsample = (PatchEmbed(patch_size=2, in_chans=dim, embed_dim=out_dim,
                                  use_conv_embed=use_conv_embed, is_stem=False)
                       if downsample else None)

  def forward(self, x, h, w):
    for blk in self.blocks:
      blk.H, blk.W = h, w
      x = blk(x)
    if self.downsample is not None:
      x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
      x, h, w = self.downsample(x)
    return x, h, w


class VideoFocalNet(nn.Module):
  """Official-layout Video-FocalNet; `forward(x)` with x of shape (B, T, 3, H, W)."""

  def __init__(self, patch_size=4, in_chans=3, num_classes=400, embed_dim=96, depths=(2, 2, 6, 2),
               mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.1, focal_levels=(2, 2, 2, 2),
               focal_windows=(3, 3, 3, 3), use_conv_embed=False, use_layerscale=False,
               layerscale_value=1e-4, use_postln=False, use_postln_in_modulation=False,
               normalize_modulator=False, num_frames=8, tubelet_size=1):
    super().__init__()
    num_layers = len(depths)
    dims = [embed_dim * 2 ** i for i in range(num_layers)]
    self.tubelet_size = tubelet_size
    self.num_frames = num_frames // tubelet_size
    self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=dims[0],
                                  use_conv_embed=use_conv_embed, is_stem=True, tubelet_size=tubelet_size)
    self.pos_drop = nn.Dropout(drop_rate)
    dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]
    self.layers = nn.ModuleList()
    for i in range(num_layers):
      self.layers.append(BasicLayer(
          dims[i], dims[i + 1] if i < num_layers - 1 else None, depths[i], mlp_ratio=mlp_ratio,
          drop=drop_rate, drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])],
          downsample=i < num_layers - 1, focal_level=focal_levels[i], focal_window=focal_windows[i],
          use_conv_embed=use_conv_embed, use_layerscale=use_layerscale,
          layerscale_value=layerscale_value, use_postln=use_postln,
          use_postln_in_modulation=use_postln_in_modulation, normalize_modulator=normalize_modulator,
          num_frames=self.num_frames))
    self.norm = nn.LayerNorm(dims[-1])
    self.avgpool = nn.AdaptiveAvgPool1d(1)
    self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()

  def forward(self, x):
    b, t, c, h, w = x.shape
    if self.tubelet_size == 1:
      x = x.reshape(-1, c, h, w)
    x, h, w = self.patch_embed(x)
    x = self.pos_drop(x)
    for layer in self.layers:
      x, h, w = layer(x, h, w)
    x = self.norm(x)
    x = torch.flatten(self.avgpool(x.transpose(1, 2)), 1)
    x = x.view(b, self.num_frames, x.shape[-1]).mean(dim=1)
    return self.head(x)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
  """Every parameter random (kernels ~ N(0, 1/fan_in), the rest perturbed) so each branch matters."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim >= 2:
        fan_in = p[0].numel()
        p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
      elif name.endswith("weight") or "gamma" in name:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.2 * torch.randn(p.shape, generator=g))
  return model
