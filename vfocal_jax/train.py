"""Training: the jitted train step over a ``('data', 'model')`` mesh and the loop around it.

The step is a pure function ``(state, batch) -> (state, metrics)``, compiled
once with ``jax.jit`` and explicit in/out shardings (the batch over ``'data'``,
parameters and optimizer state by the partition rules of ``sharding.py``), the
state donated. Inside it: mixup/cutmix with label smoothing, dropout /
stochastic-depth rngs folded from the step, optional gradient accumulation over
micro-batches, and an update that is skipped when the loss or gradient is not
finite (the loop then stops, keeping the last good checkpoint).

The loop resumes from ``workdir/checkpoints`` (state and input position),
saves asynchronously, saves and exits on SIGTERM, reports clu metrics to
TensorBoard and stdout with an ETA, evaluates, and writes ``eval_results.json``.
"""
from __future__ import annotations

import functools
import signal
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from vfocal_jax import artifacts, checkpoints, evaluate, finetune, mixup, model_card, optim, paths, pixels, sharding
from vfocal_jax import batch as batch_lib
from vfocal_jax.metrics import TrainMetrics
from vfocal_jax.train_state import TrainState, create_train_state

CURVES_PNG = "training_curves.png"


def quiet_orbax_logs() -> None:
  """Keeps Orbax's INFO chatter (several lines per save) out of the training log."""
  import logging as py_logging

  class _Filter(py_logging.Filter):
    def filter(self, record):
      return record.levelno >= py_logging.WARNING or "orbax" not in record.pathname

  absl_logger = logging.get_absl_logger()
  if not any(isinstance(f, _Filter) for f in absl_logger.filters):
    absl_logger.addFilter(_Filter())


class NonFiniteLossError(RuntimeError):
  """Raised when the loss or the gradient norm is NaN/inf (the last good checkpoint is kept)."""


# --- Model and state. ------------------------------------------------------------------------

# --- The step. -------------------------------------------------------------------------------

def _loss_and_grads(model, params, video, pixel_affine, labels, rng, config, num_classes):
  r_mix, r_drop = jax.random.split(rng)
  video = pixels.normalize(video, pixel_affine)
  if config.mixup_alpha > 0 or config.cutmix_alpha > 0:
    video, targets, _ = mixup.mixup_cutmix(
        r_mix, video, labels, num_classes=num_classes, label_smoothing=config.label_smoothing,
        mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha, switch_prob=config.mixup_switch_prob)
  else:
    targets = mixup.smooth_one_hot(labels, num_classes, config.label_smoothing)

  def loss_fn(p):
    logits = model.apply({"params": p}, video, train=True, rngs={"dropout": r_drop})
    logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy(logits, targets).mean(), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  top1 = jnp.mean(jnp.argmax(logits, -1) == labels)
  return loss, top1, grads


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model, tx: optax.GradientTransformation,
               schedule: Callable, config: ml_collections.ConfigDict, num_classes: int,
               batch_spec: P | None = None) -> tuple[TrainState, TrainMetrics]:
  """One optimizer update on a global batch (``accumulation_steps`` micro-batches)."""
  step_rng = jax.random.fold_in(state.rng, state.step)
  video, affine, labels = batch["video"], batch["pixel_affine"], batch["label"]
  accum = int(config.accumulation_steps)
  if accum <= 1:
    loss, top1, grads = _loss_and_grads(model, state.params, video, affine, labels, step_rng, config,
                                        num_classes)
  else:
    # Rows j*accum + a form micro-batch a: each device keeps its own rows.
    def split(x):
      x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
      x = jnp.moveaxis(x, 1, 0)
      if batch_spec is not None:
        x = jax.lax.with_sharding_constraint(x, P(None, *batch_spec, *([None] * (x.ndim - 1 - len(batch_spec)))))
      return x

    def body(carry, xs):
      g_sum, l_sum, t_sum = carry
      a, v, pa, y = xs
      l, t, g = _loss_and_grads(model, state.params, v, pa, y, jax.random.fold_in(step_rng, a), config,
                                num_classes)
      return (jax.tree.map(jnp.add, g_sum, g), l_sum + l, t_sum + t), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (grads, loss, top1), _ = jax.lax.scan(body, init, (jnp.arange(accum), split(video), split(affine), split(labels)))
    grads = jax.tree.map(lambda g: g / accum, grads)
    loss, top1 = loss / accum, top1 / accum

  grad_norm = optax.global_norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                            opt_state=keep(opt_state, state.opt_state))
  metrics = TrainMetrics.single_from_model_output(
      loss=loss, top1=top1, grad_norm=grad_norm, learning_rate=schedule(state.step),
      non_finite=1.0 - finite.astype(jnp.float32))
  return new_state, metrics


# --- Setup shared by training and tests. -------------------------------------------------------

class Trainer:
  """Model, optimizer, mesh, shardings and the compiled step for one config."""

  def __init__(self, config: ml_collections.ConfigDict, steps_per_epoch: int, mesh=None,
               rules=sharding.DEFAULT_RULES):
    self.config = config
    self.mesh = mesh if mesh is not None else sharding.create_mesh(config.mesh_shape)
    self.model = artifacts.build_model(config)
    self.num_classes = int(config.model.num_classes)
    self.steps_per_epoch = max(int(steps_per_epoch), 1)
    self.total_steps = optim.total_train_steps(config, self.steps_per_epoch)
    self.schedule = optim.create_learning_rate_schedule(config, self.steps_per_epoch)
    self.tx = optim.create_optimizer(config, self.schedule)

    def init(rng):
      r_params, r_state = jax.random.split(rng)
      params = artifacts.init_params(self.model, r_params, config.num_frames, config.image_size)
      return create_train_state(r_state, params, self.tx)

    self._init = init
    self.abstract_state = jax.eval_shape(init, jax.random.PRNGKey(config.seed))
    self.state_sharding = sharding.state_shardings(
        self.abstract_state, self.mesh, rules=rules, fsdp=config.fsdp, fsdp_min_size=config.fsdp_min_size)
    self.batch_sharding = batch_lib.shardings(self.mesh, batch_lib.TRAIN_FIELDS)
    step = functools.partial(train_step, model=self.model, tx=self.tx, schedule=self.schedule, config=config,
                             num_classes=self.num_classes, batch_spec=(sharding.DATA,))
    self.train_step = jax.jit(step, in_shardings=(self.state_sharding, self.batch_sharding),
                              out_shardings=(self.state_sharding, sharding.replicated(self.mesh)),
                              donate_argnums=(0,))

  def init_state(self) -> TrainState:
    return jax.jit(self._init, out_shardings=self.state_sharding)(jax.random.PRNGKey(self.config.seed))

  def abstract_target(self) -> TrainState:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        self.abstract_state, self.state_sharding)

  def place_params(self, state: TrainState, params: Any) -> TrainState:
    """Puts host parameters into ``state`` with the state's shardings."""
    params = jax.device_put(params, self.state_sharding.params)
    return state.replace(params=params)

  def put_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return batch_lib.to_device(local_batch, self.mesh, batch_lib.TRAIN_FIELDS)


# --- The loop. -------------------------------------------------------------------------------

class _Preemption:
  """Turns SIGTERM into a flag the loop checks (single process; multi-process uses JAX's sync point)."""

  def __init__(self):
    self.requested = False
    self._previous = None
    if jax.process_count() == 1:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # Not the main thread.
        self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint and exiting.")
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except Exception:  # No preemption service (e.g. not initialised by jax.distributed).
        return False
    return self.requested

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _local_batch_size(global_batch: int) -> int:
  if global_batch % jax.process_count():
    raise ValueError(f"Global batch {global_batch} does not divide over {jax.process_count()} processes.")
  return global_batch // jax.process_count()


def create_train_iterator(config: ml_collections.ConfigDict) -> Iterator[dict[str, np.ndarray]]:
  from vfocal_jax import input_pipeline
  return input_pipeline.create_train_iterator(
      config.data, batch_size=_local_batch_size(config.batch_size * max(config.accumulation_steps, 1)),
      seed=config.seed, num_frames=config.num_frames, image_size=config.image_size,
      process_index=jax.process_index(), process_count=jax.process_count())


def steps_per_epoch_for(config: ml_collections.ConfigDict) -> int:
  """Optimizer updates per epoch from the train split size (or ``config.num_train_examples``)."""
  n = int(config.get("num_train_examples", -1))
  if n <= 0:
    from vfocal_jax import input_pipeline
    n = input_pipeline.get_dataset_info(config.data, "train").num_examples
    if not n:
      raise ValueError("The train split size is unknown (no dataset_info.json beside the shards): "
                       "set --config.num_train_examples or --config.num_train_steps.")
    n = int(n)
  return max(n // (config.batch_size * max(config.accumulation_steps, 1)), 1)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, checkpoint: str | None = None,
                       *, train_iter=None, steps_per_epoch: int | None = None,
                       overrides: Iterable[str] = ()) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints), then evaluates.

  Args:
    config: a config of ``configs/``.
    workdir: checkpoints, TensorBoard events, ``config.json`` and ``eval_results.json`` go here.
    checkpoint: a converted checkpoint or a workdir to fine-tune from (wins over
      ``config.init_checkpoint``); its architecture must be the config's, except
      the head, re-initialised when the class count differs.
    train_iter: an iterator of local batches to use instead of the pipeline (tests).
    steps_per_epoch: overrides the count from the split size (tests).
    overrides: config fields the user set explicitly (they may differ from the
      fine-tuning checkpoint's model card).

  Returns:
    The final evaluation results (also written to ``workdir/eval_results.json``)
    plus ``history``: ``(step, mean loss since the previous report)`` pairs of
    this run; on SIGTERM only ``history`` and ``preempted_at``.
  """
  quiet_orbax_logs()
  config, class_names = finetune.classes_from_data(config)
  init_from = checkpoint or config.init_checkpoint or None
  pretrained = finetune.pretrained_params(config, init_from, overrides=overrides) if init_from else None
  if steps_per_epoch is None:
    steps_per_epoch = steps_per_epoch_for(config)
  trainer = Trainer(config, steps_per_epoch)
  checkpoints.write_config(workdir, config)
  if jax.process_index() == 0:
    model_card.write_card(workdir, model_card.card_from_config(
        config, trainer.model, class_names=class_names,
        provenance={"kind": "training", "workdir": str(paths.resolve(workdir)), "init_checkpoint": init_from}))
  total = trainer.total_steps
  logging.info("Mesh %s; %d steps (%d per epoch), global batch %d x %d accumulation.",
               dict(trainer.mesh.shape), total, trainer.steps_per_epoch, config.batch_size, config.accumulation_steps)
  if train_iter is None:
    train_iter = create_train_iterator(config)

  manager = checkpoints.create_manager(workdir, keep=config.keep_checkpoints, keep_best=config.keep_best_checkpoints,
                                       async_save=config.async_checkpointing)
  state = checkpoints.restore_latest(manager, trainer.abstract_target(), train_iter)
  if state is None:
    state = trainer.init_state()
    if pretrained is not None:
      merged, reinit = finetune.merge_pretrained(sharding.to_host(state.params), pretrained)
      logging.info("Fine-tuning from %s; re-initialised (%d classes here, the checkpoint's head differs, or "
                   "missing there): %s", init_from, trainer.num_classes, reinit or "nothing")
      state = trainer.place_params(state, merged)
  start = int(sharding.to_host(state.step))
  if start:
    logging.info("Resuming at step %d.", start)

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start == 0:
    writer.write_hparams({k: v for k, v in traverse_util.flatten_dict(config.to_dict(), sep=".").items()
                          if isinstance(v, (int, float, str, bool))})
  preemption = _Preemption()
  pending: TrainMetrics | None = None
  t_last, step_last = time.time(), start
  t_start = time.time()
  num_skipped = 0
  last_good = start
  results: dict[str, Any] = {}
  history: list[tuple[int, float]] = []
  eval_step = evaluate.make_eval_step(trainer.model, trainer.num_classes, trainer.mesh, trainer.state_sharding.params)
  eval_every = max(int(round(config.eval_every_epochs * trainer.steps_per_epoch)), 1) if config.eval_every_epochs > 0 else 0
  try:
    with trainer.mesh:
      step = start
      while step < total:
        batch = next(train_iter)
        num_skipped = int(np.max(batch.get("num_skipped", 0)))
        state, m = trainer.train_step(state, trainer.put_batch(batch))
        pending = m if pending is None else pending.merge(m)
        step += 1
        is_last = step == total
        stop = preemption.reached(step)
        if step % config.log_every_steps == 0 or is_last or stop or step % config.checkpoint_every_steps == 0:
          values = pending.compute()
          pending = None
          values = {k: float(v) for k, v in sharding.to_host(values).items()}
          if values["non_finite"] > 0:
            raise NonFiniteLossError(
                f"Non-finite loss or gradient before step {step} (loss={values['loss']}, grad_norm="
                f"{values['grad_norm']}); the update was skipped and training stopped. The last good "
                f"checkpoint (step {last_good}) is kept in {manager.directory}. Try a lower learning rate, "
                "float32 compute (--config.model.dtype=float32) or gradient clipping.")
          now = time.time()
          rate = (step - step_last) / max(now - t_last, 1e-9)
          eta = (total - step) / max(rate, 1e-9)
          values.update(clips_per_sec=rate * config.batch_size * max(config.accumulation_steps, 1),
                        steps_per_sec=rate, num_skipped=num_skipped, epoch=step / trainer.steps_per_epoch)
          writer.write_scalars(step, values)
          history.append((step, values["loss"]))
          logging.info("step %d/%d (%.1f%%) loss %.4f top1 %.3f lr %.3g |g| %.3g %.1f clips/s ETA %s skipped %d",
                       step, total, 100.0 * step / total, values["loss"], values["top1"], values["learning_rate"],
                       values["grad_norm"], values["clips_per_sec"], _fmt_time(eta), num_skipped)
          t_last, step_last = now, step
        eval_now = eval_every and step % eval_every == 0 and not is_last
        metrics_for_ckpt = None
        if eval_now:
          res = evaluate.evaluate_params(config, trainer.model, state.params, trainer.mesh,
                                         num_clips=config.eval_num_clips, num_crops=config.eval_num_crops,
                                         step_fn=eval_step)
          writer.write_scalars(step, {f"eval/{k}": v for k, v in res.items() if isinstance(v, float)})
          metrics_for_ckpt = {"top1": res["top1"]}
        if stop or is_last or eval_now or step % config.checkpoint_every_steps == 0:
          checkpoints.save(manager, step, state, train_iter, metrics=metrics_for_ckpt, force=True)
          last_good = step
        if stop:
          logging.warning("Preempted at step %d: checkpoint saved, exiting.", step)
          manager.wait_until_finished()
          return {"history": history, "preempted_at": step}
      logging.info("Training done: %d steps in %s.", total - start, _fmt_time(time.time() - t_start))
      results = evaluate.evaluate_params(config, trainer.model, state.params, trainer.mesh,
                                         num_clips=config.test_num_clips, num_crops=config.test_num_crops,
                                         step_fn=eval_step)
      results["step"] = int(total)
      evaluate.write_results(workdir, results)
      writer.write_scalars(total, {f"test/{k}": v for k, v in results.items() if isinstance(v, float)})
      writer.flush()
      _write_training_curves(workdir)
      results["history"] = history
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.flush()
    preemption.restore()
  return results


def _write_training_curves(workdir: str) -> None:
  """``workdir/training_curves.png`` from the run's TensorBoard events (process 0; never fails the run)."""
  if jax.process_index() != 0:
    return
  from vfocal_jax import plots
  try:
    logging.info("Wrote %s", plots.plot_training_curves(workdir, paths.join(workdir, CURVES_PNG)))
  except Exception as e:  # A figure is never worth losing the run over.
    logging.warning("Could not draw the training curves: %s", e)


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}"
