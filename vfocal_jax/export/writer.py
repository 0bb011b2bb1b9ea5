"""`vfocal export`: a converted checkpoint or a workdir -> a serving artifact that runs without Flax.

    OUT/model.jax          jax.export of the clip forward, weights inside: uint8 (B, T, H, W, 3) RGB -> float32
                           logits (B, C); B symbolic; normalisation (the card's mean/std) inside; cpu, cuda, tpu
    OUT/saved_model/       TF SavedModel (jax2tf): `serving_default` video -> logits, probabilities; `views`
                           video (B, V, T, H, W, 3) -> the view-averaged probabilities; weights as variables
    OUT/golden.npz         a few uint8 clips and the Flax model's logits of them (a server's start-up check)
    OUT/model_card.json    the model card plus `export`: platforms, versions, calling convention, sha256s

Depthwise convolutions: `lax.platform_dependent` picks, on the machine that
runs the artifact, what `depthwise_impl='auto'` picks for one device there:
the shifted multiplies on CPU, XLA's grouped convolution on cuda and tpu.
(Resolving 'auto' while exporting would bake in the exporting machine's
choice, the CPU one, for every target.) Both branches share the weights, so
the artifact grows only by the second copy of the program (measured in
docs/serving.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import time
from collections.abc import Callable, Sequence
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import export as jax_export
from jax import lax

from vfocal_jax import artifacts, errors, paths, pixels
from vfocal_jax.export import runtime

__all__ = ["DEFAULT_PLATFORMS", "DEPTHWISE_IMPL", "clip_logits_fn", "views_probabilities_fn", "export_clip_fn",
           "tensorflow_lowering", "save_saved_model", "golden_clips", "run"]

DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
DEPTHWISE_IMPL = {"cpu": "shift", "default": "xla"}  # What 'auto' resolves to on one device of each platform.
NUM_GOLDEN = 2
GOLDEN_SEED = 0
# Golden-check tolerances on |logit - expected|. cpu: float32 as exported (the tests see < 1e-5). Elsewhere
# the default matmul precision is lower (TF32 on recent GPUs, one bfloat16 pass on TPU): a loose bound
# relative to the logits' scale, not measured on those platforms.
CPU_ATOL = 1e-4
OTHER_RTOL = 5e-2
SAVED_MODEL_STABLEHLO = "WEEK_12"  # What TensorFlow 2.21 reads (see `tensorflow_lowering`).


def normalization(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """float32 ``(scale, offset)`` with ``x * scale + offset == (x - mean) / std``, rounded as the pipeline's
  ``normalization_affine`` rounds them (so the exported model sees the pixels eval and predict feed)."""
  scale = np.float32(1.0) / np.asarray(std, np.float32)
  return scale, (-np.asarray(mean, np.float32) * scale).astype(np.float32)


def clip_logits_fn(model: Any, mean: Sequence[float], std: Sequence[float]) -> Callable[[Any, jax.Array], jax.Array]:
  """``fn(params, video uint8 (B, T, H, W, 3)) -> float32 logits (B, C)``: normalise, then the eval forward.

  The depthwise implementation is chosen by the platform that runs the program (``DEPTHWISE_IMPL``).
  """
  scale, offset = normalization(mean, std)

  def forward(impl: str):
    m = model.clone(depthwise_impl=impl)

    def apply(p, video):
      x = video.astype(jnp.float32) * scale + offset
      return m.apply({"params": p}, x, train=False).astype(jnp.float32)
    return apply

  def fn(p, video):
    return lax.platform_dependent(p, video, cpu=forward(DEPTHWISE_IMPL["cpu"]),
                                  default=forward(DEPTHWISE_IMPL["default"]))
  return fn


def views_probabilities_fn(clip_fn: Callable[[Any, jax.Array], jax.Array], clip_shape: Sequence[int]):
  """``fn(params, video (B, V, T, H, W, 3)) -> (B, C)``: the softmax of every view, averaged per video."""
  def fn(p, video):
    b, v = video.shape[:2]
    logits = clip_fn(p, video.reshape((b * v,) + tuple(clip_shape)))
    return jax.nn.softmax(logits, axis=-1).reshape(b, v, -1).mean(axis=1)
  return fn


def export_clip_fn(clip_fn: Callable[[Any, jax.Array], jax.Array], params: Any, clip_shape: Sequence[int],
                    platforms: Sequence[str] = DEFAULT_PLATFORMS) -> jax_export.Exported:
  """``jax.export`` of ``clip_fn`` with ``params`` closed over (constants in the module) and a symbolic batch."""
  t, h, w, c = clip_shape
  spec = jax.ShapeDtypeStruct(jax_export.symbolic_shape(f"b, {t}, {h}, {w}, {c}"), jnp.uint8)
  params = jax.tree.map(jnp.asarray, params)
  return jax_export.export(jax.jit(lambda video: clip_fn(params, video)), platforms=tuple(platforms))(spec)


# XLA's float32 erf (and Eigen's): x clamped to +-c, c = erfinv(1 - 2^-23), then x * P(x^2) / Q(x^2).
_ERF_CLAMP = 3.7439211627767994
_ERF_ALPHA = (0.00022905065861350646, 0.0034082910107109506, 0.050955695062380861, 0.18520832239976145,
              1.128379143519084)
_ERF_BETA = (-1.1791602954361697e-7, 0.000023547966471313185, 0.0010179625278914885, 0.014070470171167667,
             0.11098505178285362, 0.49746925110067538, 1.0)


def erf_rational(x: jax.Array) -> jax.Array:
  """erf as XLA expands it for float32 (other float dtypes go through float32), in plain StableHLO ops."""
  x32 = jnp.clip(x.astype(jnp.float32), -_ERF_CLAMP, _ERF_CLAMP)
  x2 = x32 * x32
  alpha, beta = jnp.float32(_ERF_ALPHA[0]), jnp.float32(_ERF_BETA[0])
  for a in _ERF_ALPHA[1:]:
    alpha = alpha * x2 + jnp.float32(a)
  for b in _ERF_BETA[1:]:
    beta = beta * x2 + jnp.float32(b)
  return (x32 * alpha / beta).astype(x.dtype)


@contextlib.contextmanager
def tensorflow_lowering():
  """Inside this block, ``jax.export`` (and so ``jax2tf``) writes modules TensorFlow 2.21 can run.

  Two differences between jax 0.10.2 and TensorFlow 2.21's ``XlaCallModule``:
  - jax writes StableHLO 1.15.0 (``WEEK_4``: for consumers at most a month old); TensorFlow reads at
    most 1.13.7, which ``WEEK_12`` gives with this jaxlib (it cannot read ``vhlo.composite_v2``);
  - jax's ``erf`` is a ``chlo.erf``, serialized as a composite whose body TensorFlow's shape refinement
    leaves dynamic ("Module has dynamic shapes"): here it lowers to ``erf_rational`` instead.
  jax has no public setting for either: this patches the StableHLO version lookup of
  ``jax._src.export._export`` and the erf lowering rule while the block runs. Yields the version.
  """
  from jax._src.export import _export  # pylint: disable=import-outside-toplevel
  from jax._src.interpreters import mlir  # pylint: disable=import-outside-toplevel
  lookup = _export.hlo.get_version_from_compatibility_requirement
  version = lookup(getattr(_export.hlo.StablehloCompatibilityRequirement, SAVED_MODEL_STABLEHLO))
  erf_entry = dataclasses.replace(mlir._lowerings[lax.erf_p],  # pylint: disable=protected-access
                                  rule=mlir.lower_fun(erf_rational, multiple_results=False))
  with mock.patch.object(_export.hlo, "get_version_from_compatibility_requirement", lambda _: version), \
      mock.patch.dict(mlir._lowerings, {lax.erf_p: erf_entry}):  # pylint: disable=protected-access
    yield version


def save_saved_model(directory: Any, clip_fn, params: Any, clip_shape: Sequence[int],
                     platforms: Sequence[str]) -> None:
  """A TF SavedModel (jax2tf, XlaCallModule ops) with the weights as variables and two signatures."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from jax.experimental import jax2tf  # pylint: disable=import-outside-toplevel
  t, h, w, c = clip_shape
  params_vars = tf.nest.map_structure(lambda a: tf.Variable(np.asarray(a), trainable=False), params)

  def logits_and_probabilities(p, video):
    logits = clip_fn(p, video)
    return logits, jax.nn.softmax(logits, axis=-1)

  convert = dict(with_gradient=False, native_serialization_platforms=tuple(platforms))
  clip_tf = jax2tf.convert(logits_and_probabilities, polymorphic_shapes=[None, f"(b, {t}, {h}, {w}, {c})"],
                           **convert)
  views_tf = jax2tf.convert(views_probabilities_fn(clip_fn, clip_shape),
                            polymorphic_shapes=[None, f"(b, v, {t}, {h}, {w}, {c})"], **convert)

  @tf.function(autograph=False, input_signature=[tf.TensorSpec((None, t, h, w, c), tf.uint8, name="video")])
  def serving_default(video):
    logits, probabilities = clip_tf(params_vars, video)
    return {"logits": logits, "probabilities": probabilities}

  @tf.function(autograph=False, input_signature=[tf.TensorSpec((None, None, t, h, w, c), tf.uint8, name="video")])
  def views(video):
    return {"probabilities": views_tf(params_vars, video)}

  module = tf.Module()
  module._variables = tf.nest.flatten(params_vars)  # pylint: disable=protected-access
  module.serving_default, module.views = serving_default, views
  with tensorflow_lowering():  # Traced, lowered and serialized on saving.
    tf.saved_model.save(module, os.fspath(directory), signatures={"serving_default": serving_default,
                                                                  "views": views})


def golden_clips(model: Any, params: Any, config: Any, clip_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """``NUM_GOLDEN`` random uint8 clips and the Flax model's logits of them, normalised as predict does."""
  from vfocal_jax.input_pipeline import transforms  # pylint: disable=import-outside-toplevel
  video = np.random.default_rng(GOLDEN_SEED).integers(0, 256, (NUM_GOLDEN,) + tuple(clip_shape), np.uint8)
  affine = transforms.normalization_affine(tuple(config.data.mean), tuple(config.data.std)).numpy()
  affine = np.broadcast_to(affine, (NUM_GOLDEN, 5, 3))
  forward = jax.jit(lambda p, v, a: model.apply({"params": p}, pixels.normalize(v, a), train=False))
  return video, np.asarray(forward(params, video, affine), np.float32)


def check_output_dir(output_dir: str, overwrite: bool) -> Any:
  """``OUT`` as a path; an existing non-empty one only with ``overwrite``, and only if it holds an export."""
  if not output_dir:
    raise errors.FlagError("export needs --output_dir=OUT (a new directory, local or gs://)")
  out = paths.resolve(output_dir)
  if out.exists() and any(True for _ in out.iterdir()):
    if not overwrite:
      raise errors.OutputExistsError(f"--output_dir={output_dir} already exists: choose a new directory or pass --overwrite")
    if not (out / runtime.MODEL_FILE).exists() and not (out / runtime.CARD_FILE).exists():
      raise errors.OutputExistsError(f"--output_dir={output_dir} holds something other than an export (no "
                            f"{runtime.MODEL_FILE}): --overwrite only replaces an export; choose a new directory.")
  return out


def _files_sha256(out: Any) -> dict[str, str]:
  """sha256 of every file under ``out`` (but the card), by path relative to ``out``."""
  found, pending = {}, [out]
  while pending:  # (epath's rglob refuses '**' on gs://.)
    for path in pending.pop().iterdir():
      relative = os.path.relpath(os.fspath(path), os.fspath(out))
      if path.is_dir():
        pending.append(path)
      elif relative != runtime.CARD_FILE:
        found[relative] = runtime.sha256_of(path.read_bytes())
  return dict(sorted(found.items()))


def run(loaded: artifacts.Loaded, *, output_dir: str | None = None, overwrite: bool = False,
        platforms: Sequence[str] = DEFAULT_PLATFORMS, saved_model: bool = True) -> dict[str, Any]:
  """The `export` command: writes ``OUT`` (see the module docstring); returns its card's ``export`` entry.

  Everything is computed before anything is written: a checkpoint that does not fit its card, or an
  existing ``OUT`` without ``overwrite``, leaves ``OUT`` as it was.

  Args:
    loaded: the checkpoint or workdir with the config to run with (``resolve.artifact``: a config
      with ``model.dtype=bfloat16`` exports a bfloat16 forward; its logits stay float32).
  """
  out = check_output_dir(output_dir or "", overwrite)
  start = time.perf_counter()
  config = loaded.config
  clip_shape = (int(config.num_frames), int(config.image_size), int(config.image_size), 3)
  clip_fn = clip_logits_fn(loaded.model, config.data.mean, config.data.std)
  exported = export_clip_fn(clip_fn, loaded.params, clip_shape, platforms)
  model_bytes = exported.serialize()
  video, logits = golden_clips(loaded.model, loaded.params, config, clip_shape)
  scale = max(1.0, float(np.max(np.abs(logits))))
  logging.info("Exported %s for %s in %.1fs (%d bytes).", loaded.source, ",".join(platforms),
               time.perf_counter() - start, len(model_bytes))

  if out.exists():
    out.rmtree()
  out.mkdir(parents=True, exist_ok=True)
  (out / runtime.MODEL_FILE).write_bytes(bytes(model_bytes))
  buffer = io.BytesIO()
  np.savez(buffer, video=video, logits=logits)
  (out / runtime.GOLDEN_FILE).write_bytes(buffer.getvalue())
  if saved_model:
    with tensorflow_lowering() as saved_model_stablehlo:
      pass
    save_saved_model(out / runtime.SAVED_MODEL_DIR, clip_fn, loaded.params, clip_shape, platforms)
  import jaxlib  # pylint: disable=import-outside-toplevel
  t, h, w, c = clip_shape
  entry = {
      "format": runtime.EXPORT_FORMAT,
      "platforms": list(exported.platforms),
      "jax_version": jax.__version__,
      "jaxlib_version": jaxlib.__version__,
      "calling_convention_version": int(exported.calling_convention_version),
      "depthwise_impl": dict(DEPTHWISE_IMPL),
      "compute_dtype": jnp.dtype(loaded.model.dtype).name,
      "input": {"name": "video", "dtype": "uint8", "shape": [None, t, h, w, c],
                "layout": "RGB, 0-255; normalised inside with data.mean / data.std"},
      "output": {"name": "logits", "dtype": "float32", "shape": [None, loaded.card.num_classes]},
      "saved_model": ({"signatures": {"serving_default": "video -> logits, probabilities",
                                      "views": "video (B, V, T, H, W, 3) -> probabilities"},
                       "stablehlo_version": saved_model_stablehlo} if saved_model else None),
      "golden": {"file": runtime.GOLDEN_FILE, "clips": NUM_GOLDEN,
                 "atol": {"cpu": CPU_ATOL, "default": OTHER_RTOL * scale}},
      "source": loaded.source,
      "files": _files_sha256(out),
  }
  card_json = loaded.card.to_json()
  card_json["export"] = entry
  paths.write_json(out / runtime.CARD_FILE, card_json)
  print(f"Exported {loaded.source} to {out} in {time.perf_counter() - start:.0f}s ({', '.join(entry['platforms'])}; "
        f"uint8 clips (B, {t}, {h}, {w}, 3) -> logits (B, {loaded.card.num_classes})); see docs/serving.md")
  return entry
