"""The command line: ``vfocal COMMAND`` (or ``python -m vfocal_jax``, or ``python main.py``).

    vfocal [COMMAND] --workdir=DIR [--config=NAME|FILE.py] [--config.FIELD=VALUE ...]

Commands:
  train      train (and evaluate) a model; with no --config, the demo: builds
             the synthetic motion shards if absent, trains, evaluates. (default)
  eval       multi-view evaluation of the latest checkpoint in --workdir, or of
             a converted checkpoint (--checkpoint).
  convert    PyTorch `.pth` -> converted checkpoint (--pth, --output_dir, --variant),
             or Flax -> safetensors with the official key names (--to_torch).
  summary    parameters and GMACs per view of a config.
  predict    classify video files (--video or a CSV of paths), with Flax or an
             exported model (--exported).
  visualize  frames, spatial/temporal modulator maps and top-5 as PNG figures.
  plan       compile the train and eval steps for a TPU slice (--topology) or the
             local devices: per-chip memory, FLOPs, the compiler's step-time estimate.
  export     a serving artifact of --checkpoint or --workdir in --output_dir: jax.export
             (model.jax), a TF SavedModel, golden clips, the card (docs/serving.md).

``--config`` takes a config by name (``k400_base``: the files of
``vfocal_jax/configs``, shipped in the package) or a path. Every path may be a
``gs://`` URL. A user error (a missing file, a bad field, a checkpoint that
does not fit) is one line on stderr and exit status 2; ``predict`` exits with
1 when some videos could not be read; ``--traceback`` shows the traceback.

This is the only module that parses flags; each command is a function of the
library that takes the config and plain values.
"""
from __future__ import annotations

import os
import re
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
DEMO_CONFIG = os.path.join(CONFIG_DIR, "demo.py")
COMMANDS = ("train", "eval", "convert", "summary", "predict", "visualize", "plan", "export")
EXIT_USER_ERROR = 2

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory (or gs:// URL) for checkpoints, metrics and results.")
flags.DEFINE_bool("traceback", False, "Show the traceback of a user error instead of one line.")
# Multi-host.
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for jax.distributed (auto on TPU/SLURM).")
flags.DEFINE_integer("num_processes", None, "Number of processes for jax.distributed.")
flags.DEFINE_integer("process_id", None, "This process's index for jax.distributed.")
# Artifacts from elsewhere.
flags.DEFINE_string("checkpoint", None, "A converted checkpoint or a training workdir (eval, predict, visualize, "
                    "fine-tuning).")
# convert.
flags.DEFINE_string("pth", None, "convert: PyTorch checkpoint file (.pth) to read.")
flags.DEFINE_string("output_dir", None, "convert: where to write the converted checkpoint; visualize: where PNGs go; "
                    "export: where to write the export.")
flags.DEFINE_string("variant", None, "convert: tiny | small | base (checked against the weights).")
flags.DEFINE_string("to_torch", None, "convert: write this safetensors file from --checkpoint or --workdir instead.")
flags.DEFINE_bool("allow_partial", False, "convert: load what matches and print the report of what did not.")
flags.DEFINE_bool("imagenet", False, "convert: --pth is an ImageNet FocalNet-SRF checkpoint; inflate it.")
# predict / visualize / convert.
flags.DEFINE_list("video", None, "predict/visualize: video file(s), or one .csv of paths.")
flags.DEFINE_string("labels", None, "predict: class names to show; convert: class names for the model card "
                    "(one per line, or the official id,name CSV).")
flags.DEFINE_string("output_csv", None, "predict: write top-5 per video here.")
flags.DEFINE_string("exported", None, "predict: an export directory (written by `export`) to run instead of Flax.")
# export.
flags.DEFINE_bool("overwrite", False, "export: replace an existing export in --output_dir.")
# plan.
flags.DEFINE_string("topology", None, "plan: a TPU slice (v5e:2x2, v4:2x2x1, ...) or 'local' (default).")
flags.DEFINE_string("json", None, "plan: also write the report as JSON here.")
flags.DEFINE_bool("search_batch", False, "plan: find the largest per-chip batch that fits.")
flags.DEFINE_bool("measure", False, "plan --topology=local: also time the compiled steps.")
flags.DEFINE_float("pipeline_clips_per_core", None, "plan: measured input-pipeline rate (training clips/s per host "
                   "core, from benchmarks/bench_input_pipeline.py): report the host cores and storage bandwidth "
                   "per chip needed to feed the step.")


def config_names() -> list[str]:
  return sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_")
                and f not in ("default.py", "data.py"))


def config_by_name(argv: list[str]) -> list[str]:
  """``--config=NAME`` -> the packaged ``configs/NAME.py`` when NAME is not a file; neither is an error."""
  out = []
  for arg in argv:
    if arg.startswith("--config="):
      value = arg[len("--config="):]
      path = value.split(":")[0]
      if not os.path.exists(path):
        candidate = os.path.join(CONFIG_DIR, path + ".py")
        if not os.path.exists(candidate):
          _flag_error(ValueError(f"--config={value}: no such config file, nor a config name "
                                 f"({', '.join(config_names())})"))
        arg = "--config=" + candidate + value[len(path):]
    out.append(arg)
  return out


def explicit_overrides(argv: list[str]) -> frozenset[str]:
  """The config fields set on the command line (``--config.model.dtype=...`` -> ``model.dtype``)."""
  return frozenset(a[len("--config."):].split("=")[0] for a in argv if a.startswith("--config."))


def _flag_error(e: Exception) -> None:
  message = " ".join(str(e).replace("\\n", " ").replace("\\'", "").replace("'", "").split())
  if "Did you mean" in message:  # A misspelt config field.
    message = f"--config.{message.split()[0]}: no such config field. {message[message.index('Did you mean'):]}"
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def _define_config_flag() -> None:
  """``--config``; ml_collections applies ``--config.FIELD`` overrides here already, so errors are caught."""
  if "config" in FLAGS:
    return
  try:
    config_flags.DEFINE_config_file(
        "config", DEMO_CONFIG, "Config name (k400_tiny, ...) or file; fields can be overridden with "
        "--config.FIELD=VALUE.", lock_config=True)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    _flag_error(e)


def _config_file_error(e: BaseException) -> str | None:
  """One line for an error raised by a user's config file itself (a syntax error, or its code failing), else None.

  The packaged configs are ours: an error there is a bug and keeps its traceback.
  """
  paths = {p for p in _config_paths() if not p.startswith(CONFIG_DIR)}
  if isinstance(e, SyntaxError) and (e.filename in paths or (not e.filename and len(paths) == 1)):
    where = f"{e.filename or next(iter(paths))}" + (f":{e.lineno}" if e.lineno else "")
    return f"{where}: {e.msg} (the config file does not parse)"
  if isinstance(e, AttributeError) and "get_config" in str(e) and len(paths) == 1:
    return (f"{next(iter(paths))}: no get_config() function (a config file defines get_config() returning an "
            "ml_collections.ConfigDict)")
  mine = [f for f in traceback.extract_tb(e.__traceback__) if f.filename in paths]
  if mine:
    return f"{mine[-1].filename}:{mine[-1].lineno}: {type(e).__name__}: {e} (raised by the config file)"
  # ml_collections re-raises a TypeError/ValueError of get_config() with the traceback as its text.
  text = str(e)
  if "Error whilst parsing config file" in text:
    where = [m for m in re.finditer(r'File "([^"]+)", line (\d+)', text) if m.group(1) in paths]
    last = text.strip().splitlines()[-1].strip()
    if where:
      return f"{where[-1].group(1)}:{where[-1].group(2)}: {last} (raised by the config file)"
  return None


def _config_paths() -> set[str]:
  return {os.path.abspath(a[len("--config="):].split(":")[0]) for a in sys.argv if a.startswith("--config=")}


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag, config field or config file as one line instead of a traceback."""
  try:
    return FLAGS(config_by_name(argv))
  except Exception as e:  # pylint: disable=broad-except
    message = _config_file_error(e)
    if message:
      _flag_error(ValueError(message))
    if not isinstance(e, (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError)):
      raise
    _flag_error(e)


def _cluster_env(name: str) -> str | None:
  """A cluster variable, or None when unset or libtpu's placeholder ('WARNING: could not determine ...').

  libtpu writes those placeholders into the environment when it starts on a
  machine that is not a TPU VM (``plan`` compiling for a slice); processes
  started afterwards inherit them and must not take them for a pod.
  """
  value = os.environ.get(name)
  return None if not value or value.startswith("WARNING") else value


def _init_distributed() -> None:
  """Joins a multi-process run when asked to or auto-detected (TPU pod slice, SLURM).

  Every process then sees all devices of all hosts (``jax.devices()``), feeds its
  local ones, and the global batch is assembled from the per-process pieces.
  """
  import jax
  if FLAGS.coordinator_address or FLAGS.num_processes:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  elif (_cluster_env("TPU_NAME") or _cluster_env("CLOUD_TPU_TASK_ID") or _cluster_env("TPU_WORKER_HOSTNAMES")
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1):
    jax.distributed.initialize()  # Cluster auto-detection: TPU metadata, or SLURM's variables.
  logging.info("Process %d of %d; %d local / %d global devices (%s).", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.default_backend())


def _official_defaults():
  from vfocal_jax.configs import default  # pylint: disable=import-outside-toplevel
  return default.get_config()


def run_command(command: str, config, *, config_given: bool, overrides: frozenset[str]) -> None:
  """Runs one command with parsed flags."""
  if command == "summary":
    from vfocal_jax import summary
    summary.print_summary(config.model, num_frames=config.num_frames, image_size=config.image_size)
    return
  if command == "plan":
    from vfocal_jax import plan
    plan.run(config, topology=FLAGS.topology, json_path=FLAGS.json, search_batch=FLAGS.search_batch,
             measure=FLAGS.measure, pipeline_clips_per_core=FLAGS.pipeline_clips_per_core)
    return
  if command == "convert":
    from vfocal_jax.convert import cli
    cli.run(config=config if config_given else _official_defaults(), pth=FLAGS.pth, output_dir=FLAGS.output_dir,
            variant=FLAGS.variant, to_torch=FLAGS.to_torch, checkpoint=FLAGS.checkpoint, workdir=FLAGS.workdir,
            allow_partial=FLAGS.allow_partial, imagenet=FLAGS.imagenet, labels=FLAGS.labels,
            config_given=config_given)
    return
  if command == "export":
    from vfocal_jax.export import writer
    writer.run(config if config_given or overrides else None, checkpoint=FLAGS.checkpoint, workdir=FLAGS.workdir,
               output_dir=FLAGS.output_dir, overwrite=FLAGS.overwrite, config_given=config_given,
               overrides=overrides)
    return
  if FLAGS.workdir is None and command == "train":
    raise app.UsageError("--workdir is required: checkpoints and metrics go there.")
  _init_distributed()
  artifact = dict(config_given=config_given, overrides=overrides)
  if command == "train":
    from vfocal_jax import train
    from vfocal_jax import train_config
    from vfocal_jax.data import demo_dataset
    train_config.validate(config)  # Before the demo shards or anything else are written.
    config = demo_dataset.prepare(config, FLAGS.workdir)
    train.train_and_evaluate(config, FLAGS.workdir, checkpoint=FLAGS.checkpoint, overrides=overrides)
  elif command == "eval":
    from vfocal_jax import evaluate
    evaluate.evaluate_checkpoint(config, workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint, **artifact)
  elif command == "predict":
    from vfocal_jax import predict
    predict.run(config, workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint, videos=FLAGS.video,
                labels=FLAGS.labels, output_csv=FLAGS.output_csv, exported=FLAGS.exported, **artifact)
  elif command == "visualize":
    from vfocal_jax import visualize
    visualize.run(config, workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint, videos=FLAGS.video,
                  output_dir=FLAGS.output_dir, labels=FLAGS.labels, **artifact)


def _user_errors() -> tuple[type[BaseException], ...]:
  """Exceptions that mean the input was wrong (shown as one line), not that the program is."""
  from vfocal_jax import predict  # pylint: disable=import-outside-toplevel
  return (ValueError, OSError, KeyError, predict.PredictionFailed)


def main(argv: list[str]) -> None:
  command = argv[1] if len(argv) > 1 else "train"
  if len(argv) > 2 or command not in COMMANDS:
    raise app.UsageError(f"Unknown command {argv[1:]!r}; expected one of {COMMANDS}.")
  config_given = FLAGS["config"].present > 0
  try:
    from vfocal_jax import artifacts  # pylint: disable=import-outside-toplevel
    artifacts.model_kwargs(FLAGS.config.model)  # Names a bad model field before anything runs.
    run_command(command, FLAGS.config, config_given=config_given, overrides=explicit_overrides(sys.argv))
  except _user_errors() as e:
    if FLAGS.traceback:
      raise
    from vfocal_jax import predict  # pylint: disable=import-outside-toplevel
    message = str(e).strip() if not isinstance(e, KeyError) else f"missing key {e}"
    print(f"error: {message}" + ("" if isinstance(e, predict.PredictionFailed) else
                                 "  (--traceback shows where)"), file=sys.stderr)
    sys.exit(predict.EXIT_STATUS_FAILED if isinstance(e, predict.PredictionFailed) else EXIT_USER_ERROR)


def run() -> None:
  """The console entry point (``vfocal``)."""
  logging.set_verbosity(logging.INFO)
  sys.argv = config_by_name(sys.argv)
  _define_config_flag()
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
