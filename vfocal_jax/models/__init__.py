"""Video-FocalNet models: `create_model(variant, **overrides)` and the T/S/B factories."""
from __future__ import annotations

from typing import Any

from vfocal_jax.models.video_focalnet import DESIGNS, VideoFocalNet

VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), drop_path_rate=0.2),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), drop_path_rate=0.3),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), drop_path_rate=0.5),
    "custom": {},
}


def create_model(variant: str = "tiny", **overrides: Any) -> VideoFocalNet:
  """A VideoFocalNet of a named variant (K400 drop-path rates), with field overrides."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r}; expected one of {sorted(VARIANTS)}.")
  fields = set(VideoFocalNet.__dataclass_fields__) - {"parent", "name"}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"Unknown VideoFocalNet field(s) {unknown}; valid fields: {sorted(fields)}.")
  kwargs = {**VARIANTS[variant], **overrides}
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  return VideoFocalNet(**kwargs)


def video_focalnet_tiny(**overrides: Any) -> VideoFocalNet:
  return create_model("tiny", **overrides)


def video_focalnet_small(**overrides: Any) -> VideoFocalNet:
  return create_model("small", **overrides)


def video_focalnet_base(**overrides: Any) -> VideoFocalNet:
  return create_model("base", **overrides)


__all__ = ["DESIGNS", "VARIANTS", "VideoFocalNet", "create_model", "video_focalnet_tiny", "video_focalnet_small",
           "video_focalnet_base"]
