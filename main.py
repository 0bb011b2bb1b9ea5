"""vfocal_jax: the one entry point.

    python main.py [COMMAND] --workdir=DIR [--config=configs/NAME.py] [--config.FIELD=VALUE ...]

Commands:
  train      train (and evaluate) a model; with no --config, the demo: builds
             the synthetic motion shards if absent, trains, evaluates. (default)
  eval       multi-view evaluation of the latest checkpoint in --workdir, or of
             a converted checkpoint (--checkpoint).
  convert    PyTorch `.pth` -> Orbax checkpoint (--pth, --output_dir, --variant),
             or Flax -> safetensors with the official key names (--to_torch).
  summary    parameters and GMACs per view of a config.
  predict    classify video files (--video or a CSV of paths).
  visualize  frames, spatial/temporal modulator maps and top-5 as PNG figures.

Only this file parses flags; each command is a function of the library that
takes the config and plain values.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.py")
COMMANDS = ("train", "eval", "convert", "summary", "predict", "visualize")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", DEMO_CONFIG, "Config file (configs/*.py); fields can be overridden with --config.FIELD=VALUE.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
# Multi-host.
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for jax.distributed (auto on TPU).")
flags.DEFINE_integer("num_processes", None, "Number of processes for jax.distributed.")
flags.DEFINE_integer("process_id", None, "This process's index for jax.distributed.")
# Checkpoints from elsewhere.
flags.DEFINE_string("checkpoint", None, "A converted checkpoint directory (eval, predict, visualize, fine-tuning).")
# convert.
flags.DEFINE_string("pth", None, "convert: PyTorch checkpoint file (.pth) to read.")
flags.DEFINE_string("output_dir", None, "convert: where to write the Orbax checkpoint; visualize: where PNGs go.")
flags.DEFINE_string("variant", None, "convert: tiny | small | base (else taken from --config.model).")
flags.DEFINE_string("to_torch", None, "convert: write this safetensors file from --checkpoint or --workdir instead.")
flags.DEFINE_bool("allow_partial", False, "convert: load what matches and print the report of what did not.")
flags.DEFINE_bool("imagenet", False, "convert: --pth is an ImageNet FocalNet-SRF checkpoint; inflate it.")
# predict / visualize.
flags.DEFINE_list("video", None, "predict/visualize: video file(s), or one .csv of paths.")
flags.DEFINE_string("labels", None, "predict: class names, one per line.")
flags.DEFINE_string("output_csv", None, "predict: write top-5 per video here.")


def _init_distributed() -> None:
  """Joins a multi-process run when asked to (or on a TPU pod slice, auto-detected).

  Every process then sees all devices of all hosts (`jax.devices()`), feeds its
  local ones, and the global batch is assembled from the per-process pieces.
  """
  import jax
  if FLAGS.coordinator_address or FLAGS.num_processes:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  elif os.environ.get("TPU_NAME") or os.environ.get("CLOUD_TPU_TASK_ID") or os.environ.get("TPU_WORKER_HOSTNAMES"):
    jax.distributed.initialize()
  logging.info("Process %d of %d; %d local / %d global devices (%s).", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.default_backend())


def main(argv: list[str]) -> None:
  command = argv[1] if len(argv) > 1 else "train"
  if len(argv) > 2 or command not in COMMANDS:
    raise app.UsageError(f"Unknown command {argv[1:]!r}; expected one of {COMMANDS}.")
  config = FLAGS.config

  if command == "summary":
    from vfocal_jax import summary
    summary.print_summary(config.model, num_frames=config.get("num_frames"), image_size=config.get("image_size"))
    return
  if command == "convert":
    from vfocal_jax.convert import cli
    cli.run(config=config, pth=FLAGS.pth, output_dir=FLAGS.output_dir, variant=FLAGS.variant,
            to_torch=FLAGS.to_torch, checkpoint=FLAGS.checkpoint, workdir=FLAGS.workdir,
            allow_partial=FLAGS.allow_partial, imagenet=FLAGS.imagenet)
    return

  if FLAGS.workdir is None and command in ("train",):
    raise app.UsageError("--workdir is required: checkpoints and metrics go there.")
  _init_distributed()
  if command == "train":
    from vfocal_jax import train
    if config.get("dataset") == "demo":  # Write the synthetic motion shards once, point config.data at them.
      import jax
      demo_dir = config.demo_data_dir or os.path.join(FLAGS.workdir, "demo_data")
      config.data.train_shards = config.data.train_shards or os.path.join(demo_dir, "train")
      config.data.eval_shards = config.data.eval_shards or os.path.join(demo_dir, "val")
      if jax.process_index() == 0 and not os.path.exists(os.path.join(demo_dir, "DONE")):
        from data.demo_dataset import build_demo_dataset
        logging.info("Demo: writing the synthetic motion dataset to %s ...", demo_dir)
        build_demo_dataset(demo_dir, progress=True, **config.demo_dataset.to_dict())
        open(os.path.join(demo_dir, "DONE"), "w").close()
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("demo_data")
    train.train_and_evaluate(config, FLAGS.workdir, checkpoint=FLAGS.checkpoint)
  elif command == "eval":
    from vfocal_jax import evaluate
    evaluate.evaluate_checkpoint(config, workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint)
  elif command == "predict":
    from vfocal_jax import predict
    predict.run(config, workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint, videos=FLAGS.video,
                labels=FLAGS.labels, output_csv=FLAGS.output_csv)
  elif command == "visualize":
    from vfocal_jax import visualize
    visualize.run(config, workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint, videos=FLAGS.video,
                  output_dir=FLAGS.output_dir, labels=FLAGS.labels)


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  app.run(main)
