"""Jitted multi-view evaluation: exact top-1 / top-5 / per-class accuracy over a split.

Every view of a batch (``num_clips x num_crops``) goes through the model in
one call; the softmax of the views is summed per video (the released test
protocol). Padded rows (``mask == False``, added by the pipeline so every host
yields the same number of batches) are not counted, and counts are integers
summed over the whole split, so the figures are exact.
"""
from __future__ import annotations

import functools
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from vfocal_jax import artifacts, errors, paths, sharding
from vfocal_jax import batch as batch_lib
from vfocal_jax.metrics import EvalCounts

RESULTS_FILE = "eval_results.json"
CONFUSION_PNG = "confusion_matrix.png"


def eval_step(params: Any, batch: dict[str, jax.Array], *, model, num_classes: int) -> dict[str, jax.Array]:
  """Counts for one batch of the eval contract (``batch.EVAL_FIELDS``).

  ``confusion[i, j]`` counts videos of class i predicted as j (top-1).
  """
  labels, mask = batch["label"], batch["mask"]
  probs = batch_lib.view_probabilities(model, params, batch["video"], batch["pixel_affine"])
  k = min(5, num_classes)
  _, top = jax.lax.top_k(probs, k)
  m = mask.astype(jnp.int32)
  correct1 = (top[:, 0] == labels).astype(jnp.int32) * m
  correct5 = jnp.any(top == labels[:, None], axis=-1).astype(jnp.int32) * m
  safe_labels = jnp.where(mask, labels, 0)
  pairs = safe_labels * num_classes + top[:, 0]
  return {
      "count": m.sum(),
      "correct1": correct1.sum(),
      "correct5": correct5.sum(),
      "class_count": jax.ops.segment_sum(m, safe_labels, num_segments=num_classes),
      "class_correct": jax.ops.segment_sum(correct1, safe_labels, num_segments=num_classes),
      "confusion": jax.ops.segment_sum(m, pairs, num_segments=num_classes ** 2).reshape(num_classes, num_classes),
  }


def make_eval_step(model, num_classes: int, mesh, params_sharding: Any):
  """``eval_step`` jitted with the batch over ``'data'`` and replicated (summed) outputs."""
  return jax.jit(functools.partial(eval_step, model=model, num_classes=num_classes),
                 in_shardings=(params_sharding, batch_lib.shardings(mesh, batch_lib.EVAL_FIELDS)),
                 out_shardings=sharding.replicated(mesh))


def run_eval(step_fn, params: Any, batches: Iterable[dict[str, np.ndarray]], mesh, num_classes: int,
             class_names: list[str] | None = None) -> dict[str, Any]:
  """Runs ``step_fn`` over every (local) batch and returns the exact results."""
  counts = EvalCounts(num_classes)
  for i, local in enumerate(batches):
    counts.add(sharding.to_host(step_fn(params, batch_lib.to_device(local, mesh, batch_lib.EVAL_FIELDS))))
    if i % 50 == 0:
      logging.info("eval batch %d: %d videos so far", i, counts.count)
  return counts.result(class_names)


def create_eval_iterator(config: ml_collections.ConfigDict, num_clips: int, num_crops: int):
  from vfocal_jax import input_pipeline
  if config.eval_batch_size % jax.process_count():
    raise errors.ConfigError(f"--config.eval_batch_size={config.eval_batch_size}: does not divide over "
                             f"{jax.process_count()} processes")
  return input_pipeline.create_eval_iterator(
      config.data, batch_size=config.eval_batch_size // jax.process_count(), num_frames=config.num_frames,
      image_size=config.image_size, num_clips=num_clips, num_crops=num_crops,
      process_index=jax.process_index(), process_count=jax.process_count())


def _class_names(config: ml_collections.ConfigDict) -> list[str] | None:
  """The eval data's label map, when it has one."""
  from vfocal_jax import input_pipeline
  try:
    names = input_pipeline.get_dataset_info(config.data, "eval").label_names
  except (OSError, ValueError) as e:  # No label map: per-class results keyed by index.
    logging.info("No class names for the eval split (%s): classes are shown as indices.", e)
    return None
  return list(names) if names else None


def evaluate_params(config: ml_collections.ConfigDict, model, params: Any, mesh, *, num_clips: int, num_crops: int,
                    batches: Iterable[dict[str, np.ndarray]] | None = None, step_fn=None,
                    class_names: list[str] | None = None) -> dict[str, Any]:
  """Multi-view evaluation of ``params`` on the eval split of ``config.data``.

  ``step_fn`` (from ``make_eval_step``) can be passed to reuse one compiled step;
  ``class_names`` default to the eval data's label map.
  """
  num_classes = int(config.model.num_classes)
  if step_fn is None:
    step_fn = make_eval_step(model, num_classes, mesh, jax.tree.map(lambda x: x.sharding, params))
  if batches is None:
    batches = create_eval_iterator(config, num_clips, num_crops)
  with mesh:
    results = run_eval(step_fn, params, batches, mesh, num_classes, class_names or _class_names(config))
  results.update(num_clips=int(num_clips), num_crops=int(num_crops),
                 clip_offsets=str(config.data.eval_clip_offsets))
  logging.info("eval (%d clips x %d crops): top-1 %.2f%%, top-5 %.2f%% over %d videos.", num_clips, num_crops,
               results["top1"], results["top5"], results["num_videos"])
  return results


def write_results(directory: paths.PathLike, results: dict[str, Any]) -> str:
  """Writes ``directory/eval_results.json`` and ``confusion_matrix.png`` (process 0); returns the JSON path."""
  path = paths.join(directory, RESULTS_FILE)
  if jax.process_index() == 0:
    paths.write_json(path, results)
    logging.info("Wrote %s", path)
    if "confusion" in results:
      from vfocal_jax import plots
      try:
        png = plots.plot_confusion_matrix(np.asarray(results["confusion"]), paths.join(directory, CONFUSION_PNG),
                                          results.get("class_names"))
        logging.info("Wrote %s", png)
      except Exception as e:  # A figure is never worth losing the results over.
        logging.warning("Could not draw the confusion matrix: %s", e)
  return path


def evaluate_checkpoint(loaded: artifacts.Loaded, *, workdir: str | None = None,
                        batches: Iterable[dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
  """Multi-view evaluation of a loaded artifact (``resolve.evaluation``) on ``loaded.config``'s eval data.

  The architecture, clip and views come from the artifact's model card; the
  data, batch size and mesh from the config. Results go to
  ``workdir/eval_results.json`` (or next to the artifact when no workdir is given).
  """
  config = loaded.config
  mesh = sharding.create_mesh(config.mesh_shape)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), loaded.params)
  shardings = sharding.state_shardings(abstract, mesh, fsdp=config.fsdp, fsdp_min_size=config.fsdp_min_size)
  params = jax.device_put(loaded.params, shardings)
  results = evaluate_params(config, loaded.model, params, mesh, num_clips=config.test_num_clips,
                            num_crops=config.test_num_crops, batches=batches, class_names=loaded.card.class_names)
  results["checkpoint"] = loaded.source
  results["provenance"] = loaded.card.provenance
  write_results(workdir or loaded.source, results)
  return results
