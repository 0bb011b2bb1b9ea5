"""The reference client of an exported model: jax and NumPy only (no Flax, no model code).

    model = vfocal_jax.export.load("exported/k400_tiny")
    logits = model(clips)            # uint8 (B, T, H, W, 3) RGB -> float32 (B, num_classes)
    probs = model.views(views)       # uint8 (B, V, T, H, W, 3) -> view-averaged softmax (B, num_classes)
    model.check_golden()             # the stored golden clips reproduce their logits

``load`` reads ``OUT/model_card.json``, checks the sha256 of ``model.jax``,
deserializes it (``jax.export.deserialize``) and wraps its ``call`` in one
``jax.jit``. Inputs are checked here, before the call, so a clip of the wrong
shape, dtype or frame count is one ``ValueError`` naming the expected shape.
"""
from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from vfocal_jax import errors, file_checks  # Plain Python (json, math): the client stays jax-only.

__all__ = ["EXPORT_FORMAT", "MODEL_FILE", "SAVED_MODEL_DIR", "GOLDEN_FILE", "CARD_FILE", "ExportedModel", "load",
           "read_export_card", "sha256_of"]

EXPORT_FORMAT = "vfocal_jax.export/1"
MODEL_FILE = "model.jax"
SAVED_MODEL_DIR = "saved_model"
GOLDEN_FILE = "golden.npz"
CARD_FILE = "model_card.json"  # The same name as model_card.CARD_FILE (that module imports ml_collections).


def _path(path: str | os.PathLike) -> Any:
  """A local path or a ``gs://`` URL as an ``epath.Path`` (``etils``: no Flax, TensorFlow only for URLs)."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  text = os.fspath(path)
  return epath.Path(text if "://" in text else os.path.abspath(os.path.expanduser(text)))


def sha256_of(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def read_export_card(directory: str | os.PathLike) -> dict[str, Any]:
  """``OUT/model_card.json`` of an export, or a one-line error saying what ``directory`` is not."""
  card_path = _path(directory) / CARD_FILE
  if not (_path(directory) / MODEL_FILE).exists() or not card_path.exists():
    raise errors.MissingFileError(directory, f"not an exported model (no {MODEL_FILE} and {CARD_FILE}); make one "
                                  "with `main.py export --checkpoint=DIR --output_dir=OUT`")
  fc = file_checks
  card = fc.mapping(fc.parse_json(card_path.read_bytes(), card_path), card_path)
  export = card.get("export") or {}
  if not isinstance(export, dict) or export.get("format") != EXPORT_FORMAT:
    raise fc.BadFileError(card_path, f"not a {EXPORT_FORMAT} export card (export.format="
                                     f"{export.get('format') if isinstance(export, dict) else export!r:.60})")
  for name, digest in fc.mapping(export.get("files"), card_path, "export.files").items():
    fc.string(digest, card_path, f"export.files.{name}")
  golden = fc.mapping(export.get("golden"), card_path, "export.golden")
  tolerances = fc.mapping(golden.get("atol"), card_path, "export.golden.atol")
  fc.number(tolerances.get("default"), card_path, "export.golden.atol.default", lo=0)
  for platform, atol in tolerances.items():
    fc.number(atol, card_path, f"export.golden.atol.{platform}", lo=0)
  fields = fc.mapping(card.get("fields"), card_path, "fields")
  fc.integer(fields.get("num_frames"), card_path, "num_frames", lo=1, hi=4096)
  fc.integer(fields.get("image_size"), card_path, "image_size", lo=32, hi=8192)
  classes = fc.integer(fields.get("model.num_classes"), card_path, "model.num_classes", lo=1, hi=1 << 20)
  if card.get("class_names") is not None:
    fc.strings(card["class_names"], card_path, "class_names", length=classes)
  return card


class ExportedModel:
  """A deserialized export: ``model(clips)`` -> logits, ``model.views(views)`` -> probabilities."""

  def __init__(self, exported: Any, card: Mapping[str, Any], directory: str = ""):
    self.exported = exported
    self.card = dict(card)
    self.directory = directory
    fields = self.card["fields"]
    self.num_frames = int(fields["num_frames"])
    self.image_size = int(fields["image_size"])
    self.num_classes = int(fields["model.num_classes"])
    self.class_names: list[str] | None = self.card.get("class_names")
    self._call = jax.jit(exported.call)

  @property
  def clip_shape(self) -> tuple[int, int, int, int]:
    """``(T, H, W, 3)`` of one clip."""
    return (self.num_frames, self.image_size, self.image_size, 3)

  def check_input(self, video: Any, *, views: bool = False) -> np.ndarray:
    """``video`` as a uint8 array of clips, or a ``ValueError`` naming the expected shape and dtype."""
    t, h, w, c = self.clip_shape
    expected = f"(B, V, {t}, {h}, {w}, {c})" if views else f"(B, {t}, {h}, {w}, {c})"
    array = video if isinstance(video, (np.ndarray, jax.Array)) else np.asarray(video)
    ndim = 6 if views else 5
    if array.dtype != np.uint8 or array.ndim != ndim or tuple(array.shape[-4:]) != self.clip_shape \
        or any(d == 0 for d in array.shape[:ndim - 4]):
      raise ValueError(f"video: expected uint8 RGB {'views' if views else 'clips'} of shape {expected} "
                       f"({t} frames of {h}x{w}, 0-255), got {array.dtype} {tuple(array.shape)}; decode and cut "
                       "clips as `vfocal predict` does (docs/serving.md).")
    return array

  def __call__(self, video: Any) -> jax.Array:
    """float32 logits ``(B, num_classes)`` of uint8 clips ``(B, T, H, W, 3)``."""
    return self._call(self.check_input(video))

  def views(self, video: Any) -> jax.Array:
    """The softmax averaged over each video's views: uint8 ``(B, V, T, H, W, 3)`` -> ``(B, num_classes)``."""
    array = self.check_input(video, views=True)
    b, v = array.shape[:2]
    logits = self._call(array.reshape((b * v,) + self.clip_shape))
    return jax.nn.softmax(logits, axis=-1).reshape(b, v, -1).mean(axis=1)

  def golden(self) -> tuple[np.ndarray, np.ndarray]:
    """The stored golden clips (uint8) and their expected float32 logits."""
    path = _path(self.directory) / GOLDEN_FILE
    try:
      data = np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
      video, logits = np.asarray(data["video"]), np.asarray(data["logits"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
      raise errors.BadFileError(path, f"not the golden clips of an export ({type(e).__name__}: {e}); export "
                                      "again") from None
    if video.dtype != np.uint8 or video.shape[1:] != self.clip_shape or logits.shape != (len(video), self.num_classes):
      raise errors.BadFileError(path, f"holds video {video.dtype} {video.shape} and logits {logits.shape}, expected "
                                      f"uint8 (N, {', '.join(map(str, self.clip_shape))}) and (N, {self.num_classes})")
    return video, logits

  def check_golden(self, atol: float | None = None) -> float:
    """The largest |logit - expected| over the golden clips; a ``ValueError`` above ``atol``.

    ``atol`` defaults to the card's tolerance for this platform (``export.golden.atol``).
    """
    video, expected = self.golden()
    got = np.asarray(self(video), np.float64)
    diff = float(np.max(np.abs(got - expected)))
    if atol is None:
      tolerances = self.card["export"]["golden"]["atol"]
      atol = float(tolerances.get(jax.default_backend(), tolerances["default"]))
    if not diff <= atol:
      raise errors.BadFileError(self.directory, f"the golden clips give logits {diff:.3g} away from the expected "
                                                f"ones (tolerance {atol:g} on {jax.default_backend()})")
    return diff


def load(directory: str | os.PathLike, *, verify: bool = True) -> ExportedModel:
  """The exported model in ``directory`` (local or ``gs://``), ready to call.

  Args:
    verify: check ``model.jax`` against the sha256 in the card first.
  """
  from jax import export as jax_export  # pylint: disable=import-outside-toplevel
  card = read_export_card(directory)
  data = (_path(directory) / MODEL_FILE).read_bytes()
  if verify:
    want = card["export"]["files"].get(MODEL_FILE)
    if sha256_of(data) != want:
      raise errors.BadFileError(_path(directory) / MODEL_FILE, f"sha256 {sha256_of(data)[:12]}... differs from the "
                                f"card's {str(want)[:12]}...: the file is damaged or from another export")
  try:
    exported = jax_export.deserialize(bytearray(data))
  except Exception as e:  # pylint: disable=broad-except  # flatbuffers/MLIR raise many kinds on damaged bytes.
    raise errors.BadFileError(_path(directory) / MODEL_FILE, f"cannot be deserialized ({type(e).__name__}: "
                              f"{str(e)[:200]}); export again (or load with verify=True to check its sha256)") from None
  return ExportedModel(exported, card, os.fspath(directory))
