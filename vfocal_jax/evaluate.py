"""Jitted multi-view evaluation: exact top-1 / top-5 / per-class accuracy over a split.

Every view of a batch (``num_clips x num_crops``) goes through the model in
one call; the softmax of the views is summed per video (the released test
protocol). Padded rows (``mask == False``, added by the pipeline so every host
yields the same number of batches) are not counted, and counts are integers
summed over the whole split, so the figures are exact.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from vfocal_jax import pixels, sharding
from vfocal_jax.metrics import EvalCounts

RESULTS_FILE = "eval_results.json"
CONFUSION_PNG = "confusion_matrix.png"


def eval_step(params: Any, batch: dict[str, jax.Array], *, model, num_classes: int) -> dict[str, jax.Array]:
  """Counts for one batch: ``video`` (B, V, T, H, W, 3), ``label`` (B,), ``mask`` (B,).

  ``video`` holds pixels and ``pixel_affine`` (B, 5, 3) their normalisation,
  as the pipeline yields them (``pixels.normalize``). ``confusion[i, j]``
  counts videos of class i predicted as j (top-1).
  """
  video, labels, mask = pixels.normalize(batch["video"], batch["pixel_affine"]), batch["label"], batch["mask"]
  b, v = video.shape[:2]
  logits = model.apply({"params": params}, video.reshape((b * v,) + video.shape[2:]), train=False)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(b, v, num_classes).sum(axis=1)
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
  batch_sharding = {"video": sharding.batch_sharding(mesh, 6), "pixel_affine": sharding.batch_sharding(mesh, 3),
                    "label": sharding.batch_sharding(mesh, 1), "mask": sharding.batch_sharding(mesh, 1)}
  return jax.jit(functools.partial(eval_step, model=model, num_classes=num_classes),
                 in_shardings=(params_sharding, batch_sharding), out_shardings=sharding.replicated(mesh))


def run_eval(step_fn, params: Any, batches: Iterable[dict[str, np.ndarray]], mesh, num_classes: int,
             class_names: list[str] | None = None) -> dict[str, Any]:
  """Runs ``step_fn`` over every (local) batch and returns the exact results."""
  counts = EvalCounts(num_classes)
  for i, batch in enumerate(batches):
    batch = pixels.with_pixel_affine(batch)
    arrays = sharding.global_batch({"video": batch["video"], "pixel_affine": batch["pixel_affine"],
                                    "label": batch["label"], "mask": np.asarray(batch["mask"], bool)}, mesh)
    counts.add(sharding.to_host(step_fn(params, arrays)))
    if i % 50 == 0:
      logging.info("eval batch %d: %d videos so far", i, counts.count)
  return counts.result(class_names)


def create_eval_iterator(config: ml_collections.ConfigDict, num_clips: int, num_crops: int):
  from vfocal_jax import input_pipeline
  if config.eval_batch_size % jax.process_count():
    raise ValueError(f"eval_batch_size {config.eval_batch_size} does not divide over {jax.process_count()} processes.")
  return input_pipeline.create_eval_iterator(
      config.data, batch_size=config.eval_batch_size // jax.process_count(), num_frames=config.num_frames,
      image_size=config.image_size, num_clips=num_clips, num_crops=num_crops,
      process_index=jax.process_index(), process_count=jax.process_count())


def _class_names(config: ml_collections.ConfigDict) -> list[str] | None:
  try:
    from vfocal_jax import input_pipeline
    names = input_pipeline.get_dataset_info(config.data, "eval").label_names
    return list(names) if names else None
  except Exception:  # No label map: per-class results keyed by index.
    return None


def evaluate_params(config: ml_collections.ConfigDict, model, params: Any, mesh, *, num_clips: int, num_crops: int,
                    batches: Iterable[dict[str, np.ndarray]] | None = None, step_fn=None) -> dict[str, Any]:
  """Multi-view evaluation of ``params`` on the eval split of ``config.data``.

  ``step_fn`` (from ``make_eval_step``) can be passed to reuse one compiled step.
  """
  num_classes = int(config.model.num_classes)
  if step_fn is None:
    step_fn = make_eval_step(model, num_classes, mesh, jax.tree.map(lambda x: x.sharding, params))
  if batches is None:
    batches = create_eval_iterator(config, num_clips, num_crops)
  with mesh:
    results = run_eval(step_fn, params, batches, mesh, num_classes, _class_names(config))
  results.update(num_clips=int(num_clips), num_crops=int(num_crops),
                 clip_offsets=str(config.data.get("eval_clip_offsets", "uniform")))
  logging.info("eval (%d clips x %d crops): top-1 %.2f%%, top-5 %.2f%% over %d videos.", num_clips, num_crops,
               results["top1"], results["top5"], results["num_videos"])
  return results


def write_results(workdir: str, results: dict[str, Any], config: ml_collections.ConfigDict | None = None) -> str:
  """Writes ``workdir/eval_results.json`` and ``confusion_matrix.png`` (process 0); returns the JSON path."""
  path = os.path.join(workdir, RESULTS_FILE)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
      json.dump(results, f, indent=2, sort_keys=True)
    logging.info("Wrote %s", path)
    if "confusion" in results:
      from vfocal_jax import plots
      try:
        png = plots.plot_confusion_matrix(np.asarray(results["confusion"]), os.path.join(workdir, CONFUSION_PNG),
                                          results.get("class_names"))
        logging.info("Wrote %s", png)
      except Exception as e:  # A figure is never worth losing the results over.
        logging.warning("Could not draw the confusion matrix: %s", e)
  return path


def evaluate_checkpoint(config: ml_collections.ConfigDict, *, workdir: str | None, checkpoint: str | None = None,
                        batches: Iterable[dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
  """Evaluates the latest checkpoint of ``workdir`` or a converted checkpoint (``checkpoint``).

  The architecture comes from the checkpoint (``model.json`` of a converted
  one; ``workdir/config.json`` of a training run); the data, views and batch
  size from ``config``. Results go to ``workdir/eval_results.json`` (or next
  to the converted checkpoint when no workdir is given).
  """
  from vfocal_jax import checkpoints
  from vfocal_jax.train import build_model, model_kwargs
  config = ml_collections.ConfigDict(config.to_dict())  # Unlocked copy.
  if checkpoint:
    from vfocal_jax import params_io
    from vfocal_jax.models import create_model
    params, kwargs = params_io.load_params(checkpoint)
    for key in ("dtype",):
      if key in config.model:
        kwargs[key] = model_kwargs(config)[key]
    model = create_model(**kwargs)
    config.model.num_classes = int(kwargs.get("num_classes", config.model.num_classes))
    out_dir = workdir or checkpoint
  else:
    if not workdir:
      raise ValueError("eval needs --workdir (a training run) or --checkpoint (a converted checkpoint).")
    params, saved = checkpoints.load_params_from_workdir(workdir)
    config.model = saved.model
    if not config.data.get("eval_shards") and not config.data.get("tfds_name") and "data" in saved:
      config.data = saved.data  # No data given: the split the run was evaluated on.
    model = build_model(config)
    out_dir = workdir
  mesh = sharding.create_mesh(config.mesh_shape)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), params)
  shardings = sharding.state_shardings(abstract, mesh, fsdp=config.fsdp, fsdp_min_size=config.fsdp_min_size)
  params = jax.device_put(params, shardings)
  results = evaluate_params(config, model, params, mesh, num_clips=config.test_num_clips,
                            num_crops=config.test_num_crops, batches=batches)
  results["checkpoint"] = checkpoint or os.path.join(workdir, checkpoints.CHECKPOINT_DIR)
  write_results(out_dir, results, config)
  return results
