"""Training: the jitted train step over a ``('data', 'model')`` mesh and the loop around it.

The step is a pure function ``(state, batch) -> (state, metrics)``, compiled
once with ``jax.jit`` and explicit in/out shardings (the batch over ``'data'``,
parameters and optimizer state by the partition rules of ``sharding.py``), the
state donated. Inside it: mixup/cutmix with label smoothing, dropout /
stochastic-depth rngs folded from the step, optional gradient accumulation over
micro-batches, and an update that is skipped when the loss or gradient is not
finite (the loop then stops, naming the last committed checkpoint).

``train_and_evaluate`` is the loop: it resumes from ``workdir/checkpoints``
(state, input position, the open metrics window), runs the periodic actions of
``loop_actions.py`` after each step (log, eval, checkpoint) with clu's
``ReportProgress`` (steps/s, ETA), stops on SIGTERM with a committed checkpoint
and exit status ``preemption.EXIT_PREEMPTED``, and ends with the multi-view
test (``eval_results.json``) and ``training_curves.png``.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vfocal_jax import artifacts, checkpoints, evaluate, finetune, loop_actions, mixup, model_card, optim, paths, pixels
from vfocal_jax import errors, sharding, train_config, workdir_config
from vfocal_jax import batch as batch_lib
from vfocal_jax.data import demo_dataset
from vfocal_jax.loop_actions import CURVES_PNG, NonFiniteLossError  # noqa: F401  (part of this module's API)
from vfocal_jax.metrics import MetricWindow, TrainMetrics
from vfocal_jax.models.layers import resolve_depthwise_impl
from vfocal_jax.preemption import EXIT_PREEMPTED, Preemption  # noqa: F401
from vfocal_jax.train_state import TrainState, create_train_state


def quiet_orbax_logs() -> None:
  """Keeps Orbax's INFO chatter (several lines per save) out of the training log, and its tracebacks.

  Orbax logs a failed background save as ERROR with the thread's traceback;
  the loop raises one ``CheckpointWriteError`` for it (its cause chained, for
  ``--traceback``), so only Orbax's message line is kept.
  """
  import logging as py_logging

  class _Filter(py_logging.Filter):
    def filter(self, record):
      if "orbax" not in record.pathname:
        return True
      record.exc_info, record.exc_text = None, None
      return record.levelno >= py_logging.WARNING

  absl_logger = logging.get_absl_logger()
  if not any(isinstance(f, _Filter) for f in absl_logger.filters):
    absl_logger.addFilter(_Filter())


# --- The step. -------------------------------------------------------------------------------

def loss_and_grads(model, params, video: jax.Array, pixel_affine: jax.Array, labels: jax.Array, rng: jax.Array,
                   config: ml_collections.ConfigDict, num_classes: int, *, mesh: Mesh | None = None,
                   batch_spec: Sequence | P | None = None) -> tuple[jax.Array, jax.Array, Any, mixup.MixInfo]:
  """The train step's loss on one (micro-)batch: ``(loss, top1, grads, mix)``; pure, for tests too.

  ``rng`` splits into the mixing key and the dropout key (``r_mix, r_drop =
  split(rng)``). The pixels are normalised (``pixels.normalize``, float32) and
  cast to ``config.model.dtype``; with ``mixup_alpha`` or ``cutmix_alpha`` > 0
  they are blended inside each data shard of ``mesh`` (``mixup.mix_per_shard``:
  shard ``s`` of the batch's axes ``batch_spec[0]`` uses ``fold_in(r_mix, s)``;
  ``mesh`` None: the whole batch is one shard), else ``mix`` is the identity.
  ``mix`` (``mixup.MixInfo``) says exactly what was blended: output row ``i`` is
  ``x[i]`` blended with ``x[mix.perm[i]]`` (mixup weight ``lam``, or the CutMix
  box) and its target is ``lam * y[i] + (1 - lam) * y[perm[i]]``, ``y`` the
  one-hot labels smoothed by ``config.label_smoothing``. The loss is the mean
  over rows of the softmax cross-entropy of the float32 logits (train mode,
  dropout/drop-path from ``r_drop``) with those targets; ``top1`` is the
  accuracy against the unmixed ``labels``; ``grads`` the loss's gradient.
  """
  r_mix, r_drop = jax.random.split(rng)
  with jax.named_scope("input"):  # Named scopes: plan's traffic breakdown attributes ops by them.
    video = pixels.normalize(video, pixel_affine)
  alphas = dict(mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha)
  if config.mixup_alpha <= 0 and config.cutmix_alpha <= 0:
    mesh = None  # Nothing to blend: no shard_map.
  with jax.named_scope("mixup"):
    video, targets, mix = mixup.mix_per_shard(
        r_mix, video, labels, num_classes=num_classes, mesh=mesh, batch_spec=batch_spec,
        dtype=_compute_dtype(config), label_smoothing=config.label_smoothing,
        switch_prob=config.mixup_switch_prob, **alphas)

  def loss_fn(p):
    logits = model.apply({"params": p}, video, train=True, rngs={"dropout": r_drop})
    with jax.named_scope("loss"):
      logits = logits.astype(jnp.float32)
      return optax.softmax_cross_entropy(logits, targets).mean(), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  top1 = jnp.mean(jnp.argmax(logits, -1) == labels)
  return loss, top1, grads, mix


_loss_and_grads = loss_and_grads  # The name the gradient tests use.


def _compute_dtype(config: ml_collections.ConfigDict):
  """``config.model.dtype`` (None: the variant's own, applied by the model itself)."""
  name = config.model.get("dtype")
  return jnp.dtype(name) if name else None


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model, tx: optax.GradientTransformation,
               schedule: Callable, config: ml_collections.ConfigDict, num_classes: int,
               batch_spec: P | None = None, mesh: Mesh | None = None) -> tuple[TrainState, TrainMetrics]:
  """One optimizer update on a global batch (``accumulation_steps`` micro-batches).

  ``batch_spec``: the spec of the batch's leading axes on ``mesh``; mixup/CutMix
  pair clips within each of its data shards (``loss_and_grads``).
  """
  step_rng = jax.random.fold_in(state.rng, state.step)
  video, affine, labels = batch["video"], batch["pixel_affine"], batch["label"]
  accum = int(config.accumulation_steps)
  if accum <= 1:
    loss, top1, grads, _ = loss_and_grads(model, state.params, video, affine, labels, step_rng, config,
                                          num_classes, mesh=mesh, batch_spec=batch_spec)
  else:
    # Rows j*accum + a form micro-batch a: each device keeps its own rows.
    def split(x):
      x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
      x = jnp.moveaxis(x, 1, 0)
      if batch_spec is not None:
        spec = P(None, *batch_spec, *([None] * (x.ndim - 1 - len(batch_spec))))
        x = jax.lax.with_sharding_constraint(x, spec if mesh is None else NamedSharding(mesh, spec))
      return x

    def body(carry, xs):
      g_sum, l_sum, t_sum = carry
      a, v, pa, y = xs
      l, t, g, _ = loss_and_grads(model, state.params, v, pa, y, jax.random.fold_in(step_rng, a), config,
                                  num_classes, mesh=mesh, batch_spec=batch_spec)
      return (jax.tree.map(jnp.add, g_sum, g), l_sum + l, t_sum + t), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (grads, loss, top1), _ = jax.lax.scan(body, init, (jnp.arange(accum), split(video), split(affine), split(labels)))
    grads = jax.tree.map(lambda g: g / accum, grads)
    loss, top1 = loss / accum, top1 / accum

  with jax.named_scope("optimizer"):
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state))
  with jax.named_scope("metrics"):
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
    model = artifacts.build_model(config)
    # 'auto' resolved for this mesh: never XLA's grouped conv when its gradient is wrong ('model' axis > 1).
    impl = resolve_depthwise_impl(model.depthwise_impl, model_axis=int(self.mesh.shape[sharding.MODEL]))
    if model.depthwise_impl == "auto" and impl != resolve_depthwise_impl("auto"):
      logging.info("depthwise_impl='auto' -> 'shift': XLA's grouped-conv kernel gradient is wrong on a 'model' "
                   "axis > 1 (docs/design.md).")
    self.model = model.clone(depthwise_impl=impl)
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
                             num_classes=self.num_classes, batch_spec=(sharding.DATA,), mesh=self.mesh)
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

def _local_batch_size(global_batch: int) -> int:
  if global_batch % jax.process_count():
    raise errors.ConfigError(f"--config.batch_size: the global batch {global_batch} does not divide over "
                             f"{jax.process_count()} processes")
  return global_batch // jax.process_count()


def create_train_iterator(config: ml_collections.ConfigDict) -> Iterator[dict[str, np.ndarray]]:
  from vfocal_jax import input_pipeline
  return input_pipeline.create_train_iterator(
      config.data, batch_size=_local_batch_size(config.batch_size * max(config.accumulation_steps, 1)),
      seed=config.seed, num_frames=config.num_frames, image_size=config.image_size,
      process_index=jax.process_index(), process_count=jax.process_count())


def steps_per_epoch_for(config: ml_collections.ConfigDict) -> int:
  """Optimizer updates per epoch from the train split size (or ``config.num_train_examples``)."""
  n = int(config.num_train_examples)
  if n <= 0:
    from vfocal_jax import input_pipeline
    n = input_pipeline.get_dataset_info(config.data, "train").num_examples
    if not n and config.num_train_steps > 0:
      logging.warning("The train split size is unknown (no dataset_info.json beside the shards): an epoch is "
                      "taken as the whole run (%d steps) for eval_every_epochs and the warm-up in epochs.",
                      config.num_train_steps)
      return int(config.num_train_steps)
    if not n:
      raise errors.ConfigError("the train split size is unknown (no dataset_info.json beside the shards): "
                               "set --config.num_train_examples or --config.num_train_steps")
    n = int(n)
  return max(n // (config.batch_size * max(config.accumulation_steps, 1)), 1)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, checkpoint: str | None = None,
                       *, train_iter=None, steps_per_epoch: int | None = None,
                       exit_on_preemption: bool = True) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints), then evaluates.

  Args:
    config: a config of ``configs/``.
    workdir: checkpoints, TensorBoard events, ``config.json`` and ``eval_results.json`` go here.
    checkpoint: a converted checkpoint or a workdir to fine-tune from (wins over
      ``config.init_checkpoint``); its architecture must be the config's, except
      the head, re-initialised when the class count differs.
    train_iter: an iterator of local batches to use instead of the pipeline (tests).
    steps_per_epoch: overrides the count from the split size (tests).
    exit_on_preemption: on SIGTERM, end the process with ``EXIT_PREEMPTED``
      once the checkpoint has committed (at once when nothing would be lost);
      False returns instead (in-process use).

  Returns:
    The final evaluation results (also written to ``workdir/eval_results.json``)
    plus ``history``: ``(step, mean loss of the window ending there)`` pairs of
    this run; when preempted (``exit_on_preemption=False``) only ``history``
    and ``preempted_at``.

  Raises:
    ValueError: a training field of ``config`` cannot work (before anything is written).
    NonFiniteLossError: the loss or gradient became NaN/inf.
    checkpoints.CheckpointWriteError: a checkpoint could not be written (full disk).
  """
  train_config.validate(config)
  config = demo_dataset.prepare(config, workdir)  # The demo config's shards, written once (after the checks).
  preemption = Preemption(exit_process=exit_on_preemption)
  try:
    preemption.idle(f"start-up: {checkpoints.describe_latest(paths.join(workdir, checkpoints.CHECKPOINT_DIR))}, "
                    "nothing else to lose")
    return _train_and_evaluate(config, workdir, checkpoint, train_iter=train_iter, steps_per_epoch=steps_per_epoch,
                               preemption=preemption)
  finally:
    preemption.close()


def _train_and_evaluate(config, workdir, checkpoint, *, train_iter, steps_per_epoch,
                        preemption: Preemption) -> dict[str, Any]:
  quiet_orbax_logs()
  config, class_names = finetune.classes_from_data(config)
  init_from = checkpoint or config.init_checkpoint or None
  if init_from:  # Before anything is written: the checkpoint's architecture must be the config's.
    finetune.check_pretrained(config, init_from)
  if steps_per_epoch is None:
    steps_per_epoch = steps_per_epoch_for(config)
  trainer = Trainer(config, steps_per_epoch)
  workdir_config.write_config(workdir, config)
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
  window = MetricWindow()
  ckpt = loop_actions.Checkpointer(manager, every_steps=config.checkpoint_every_steps, last_step=total,
                                   train_iter=train_iter, window=window)
  state = checkpoints.restore_latest(manager, trainer.abstract_target(), train_iter)
  if state is None:
    state = trainer.init_state()
    if init_from:  # A fresh run; a resumed one has its own weights (the source may even be gone).
      merged, reinit = finetune.merge_pretrained(sharding.to_host(state.params), artifacts.load_params(init_from)[0])
      logging.info("Fine-tuning from %s; re-initialised (%d classes here, the checkpoint's head differs, or "
                   "missing there): %s", init_from, trainer.num_classes, reinit or "nothing")
      state = trainer.place_params(state, merged)
  start = int(sharding.to_host(state.step))
  if start:
    window.load_state_dict((checkpoints.read_loop_state(manager, start) or {}).get("window"))
    logging.info("Resuming at step %d (%d steps of the open metrics window carried over).", start, window.num_steps)

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start == 0:
    writer.write_hparams({k: v for k, v in traverse_util.flatten_dict(config.to_dict(), sep=".").items()
                          if isinstance(v, (int, float, str, bool))})
  eval_step = evaluate.make_eval_step(trainer.model, trainer.num_classes, trainer.mesh, trainer.state_sharding.params)
  eval_every = max(int(round(config.eval_every_epochs * trainer.steps_per_epoch)), 1) if config.eval_every_epochs > 0 else 0
  # Progress, ETA and the time spent in eval / checkpoints to the log (steps/s reach TensorBoard with the metrics).
  report = periodic_actions.ReportProgress(num_train_steps=total, every_steps=config.log_every_steps, every_secs=None)
  log = loop_actions.LogMetrics(config, window=window, writer=writer, checkpointer=ckpt, total_steps=total,
                                steps_per_epoch=trainer.steps_per_epoch)
  periodic_eval = loop_actions.PeriodicEval(config, every_steps=eval_every, total_steps=total, model=trainer.model,
                                            mesh=trainer.mesh, eval_step=eval_step, writer=writer, preemption=preemption)
  t_start = time.time()
  try:
    with trainer.mesh:
      if start < total:
        preemption.idle(f"the compilation of step {start + 1}: {checkpoints.describe_latest(ckpt.directory)}, "
                        "nothing else to lose")
        logging.info("Step %d: compiling the train step.", start + 1)
      for step in range(start + 1, total + 1):
        batch = next(train_iter)
        state, step_metrics = trainer.train_step(state, trainer.put_batch(batch))
        if step == start + 1:
          preemption.busy()  # From here, steps since the last checkpoint would be lost.
          log.start_timing(step)
        window.add(step_metrics)
        log.num_skipped = int(np.max(batch.get("num_skipped", 0)))
        report(step)
        log(step)
        stop = preemption.reached(step)
        with report.timed("eval", wait_jax_async_dispatch=False):
          eval_metrics = None if stop else periodic_eval(step, state)
        # A SIGTERM during that evaluation (single process: it stopped at its next batch) saves this step
        # now, as documented, instead of training one more. Processes of a multi-process run agree on
        # the stopping step through `reached` only.
        stop = stop or (preemption.requested and jax.process_count() == 1)
        with report.timed("checkpoint", wait_jax_async_dispatch=False):
          ckpt(step, state, metrics=eval_metrics, force=stop or eval_metrics is not None)
        if stop:
          ckpt.wait()
          writer.flush()
          if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("vfocal_preempted")
          preemption.finish(f"Preempted at step {step}: checkpoint step {step} committed in {ckpt.directory}.")
          return {"history": log.history, "preempted_at": step}
      ckpt.wait()
      writer.flush()
      preemption.idle(f"the final evaluation: training is finished and checkpoint step {total} is committed in "
                      f"{ckpt.directory}; the rerun only evaluates")
      logging.info("Training done: %d steps in %s.", total - start, loop_actions.fmt_time(time.time() - t_start))
      results = evaluate.evaluate_params(config, trainer.model, state.params, trainer.mesh,
                                         num_clips=config.test_num_clips, num_crops=config.test_num_crops,
                                         step_fn=eval_step)
      results["step"] = int(total)
      evaluate.write_results(workdir, results)
      writer.write_scalars(total, {f"test/{k}": v for k, v in results.items() if isinstance(v, float)})
      writer.flush()
      loop_actions.write_training_curves(workdir)
      results["history"] = log.history
      return results
  finally:
    _close(manager, writer)


def _close(manager, writer) -> None:
  """Waits for a save in flight and closes; never masks the error that is propagating."""
  try:
    manager.wait_until_finished()
    manager.close()
  except Exception as e:  # pylint: disable=broad-except  # Already raised as CheckpointWriteError, or about to be.
    logging.debug("Closing the checkpoint manager: %s", e)
  writer.flush()
