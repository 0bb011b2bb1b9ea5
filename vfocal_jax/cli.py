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
  make_shards  a CSV of `path,label` videos -> TFRecord shards, labels.txt, dataset_info.json
             (--csv, --output_dir, ...; also `python -m vfocal_jax.data.make_shards`).

Each command takes its own flags (``COMMAND_FLAGS``, filled where each flag is
declared below); a flag of another command is an error naming the commands
that take it. ``--config`` and ``--config.FIELD=VALUE`` go with every command
but make_shards.

``--config`` takes a config by name (``k400_base``: the files of
``vfocal_jax/configs``, shipped in the package) or a path. Every path may be a
``gs://`` URL. A user error (``errors.UserError``: a missing file, a bad
field, a checkpoint that does not fit) is one line on stderr and exit status
2; ``predict`` exits with 1 when some videos could not be read;
``--traceback`` shows the traceback. Any other exception is a bug: its
traceback is printed and the exit status is 1.

This is the only module that parses flags. It resolves what they name once
(``resolve``: the config with an artifact's card applied and checked, the
artifact loaded) and calls the library with those values.
"""
from __future__ import annotations

import os
import re
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
import ml_collections  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vfocal_jax import errors  # noqa: E402

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
DEMO_CONFIG = os.path.join(CONFIG_DIR, "demo.py")
COMMANDS = ("train", "eval", "convert", "summary", "predict", "visualize", "plan", "export", "make_shards")
EXIT_USER_ERROR = errors.EXIT_USER_ERROR

FLAGS = flags.FLAGS

# Which command takes which flag: filled by ``_flag`` as each flag is declared.
COMMAND_FLAGS: dict[str, set[str]] = {command: set() for command in COMMANDS}
_WITH_CONFIG = tuple(c for c in COMMANDS if c != "make_shards")  # --config and --config.FIELD=VALUE.
_DISTRIBUTED = ("train", "eval", "predict", "visualize")


def _flag(commands: tuple[str, ...], define, name: str, default, help_text: str, **kwargs) -> None:
  """Declares ``--name`` as a flag of ``commands`` (another command refuses it)."""
  define(name, default, f"{'/'.join(commands)}: {help_text}", **kwargs)
  for command in commands:
    COMMAND_FLAGS[command].add(name)


flags.DEFINE_bool("traceback", False, "Show the traceback of a user error instead of one line (every command).")
_flag(("train", "eval", "predict", "visualize", "convert", "export"), flags.DEFINE_string, "workdir", None,
      "directory (or gs:// URL) of a training run: checkpoints, metrics and results.")
# Multi-host.
_flag(_DISTRIBUTED, flags.DEFINE_string, "coordinator_address", None,
      "host:port of process 0 for jax.distributed (auto on TPU/SLURM).")
_flag(_DISTRIBUTED, flags.DEFINE_integer, "num_processes", None, "number of processes for jax.distributed.")
_flag(_DISTRIBUTED, flags.DEFINE_integer, "process_id", None, "this process's index for jax.distributed.")
# Artifacts from elsewhere.
_flag(("train", "eval", "predict", "visualize", "convert", "export"), flags.DEFINE_string, "checkpoint", None,
      "a converted checkpoint or a training workdir (train: the weights to fine-tune from).")
# convert.
_flag(("convert",), flags.DEFINE_string, "pth", None, "PyTorch checkpoint file (.pth) to read.")
_flag(("convert", "visualize", "export", "make_shards"), flags.DEFINE_string, "output_dir", None,
      "where the output goes (convert: the converted checkpoint; visualize: PNGs; export: the export; "
      "make_shards: the shards).")
_flag(("convert",), flags.DEFINE_string, "variant", None, "tiny | small | base | custom (checked against the weights).")
_flag(("convert",), flags.DEFINE_string, "to_torch", None,
      "write this safetensors file from --checkpoint or --workdir instead.")
_flag(("convert",), flags.DEFINE_bool, "allow_partial", False, "load what matches and print the report of what did not.")
_flag(("convert",), flags.DEFINE_bool, "imagenet", False, "--pth is an ImageNet FocalNet-SRF checkpoint; inflate it.")
# predict / visualize / convert.
_flag(("predict", "visualize"), flags.DEFINE_list, "video", None, "video file(s), or one .csv of paths.")
_flag(("predict", "visualize", "convert"), flags.DEFINE_string, "labels", None,
      "class names (one per line, or the official id,name CSV); convert: for the model card.")
_flag(("predict",), flags.DEFINE_string, "output_csv", None, "write top-5 per video here.")
_flag(("predict",), flags.DEFINE_string, "exported", None, "an export directory (written by `export`) to run instead of Flax.")
# export.
_flag(("export",), flags.DEFINE_bool, "overwrite", False, "replace an existing export in --output_dir.")
# plan.
_flag(("plan",), flags.DEFINE_string, "topology", None, "a TPU slice (v5e:2x2, v4:2x2x1, ...), NVIDIA GPUs "
      "(h100:8, a100:8, h200:8: needs the CUDA plugin) or 'local' (default).")
_flag(("plan",), flags.DEFINE_string, "json", None, "also write the report as JSON here.")
_flag(("plan",), flags.DEFINE_bool, "search_batch", False, "find the largest per-chip batch that fits.")
_flag(("plan",), flags.DEFINE_bool, "measure", False, "with --topology=local: also time the compiled steps.")
_flag(("plan",), flags.DEFINE_float, "pipeline_clips_per_core", None,
      "measured input-pipeline rate (training clips/s per host core, from benchmarks/bench_input_pipeline.py): "
      "report the host cores and storage bandwidth per chip needed to feed the step.")
# make_shards.
_flag(("make_shards",), flags.DEFINE_string, "csv", None, "CSV of `path,label` lines.")
_flag(("make_shards",), flags.DEFINE_string, "video_root", None, "directory the CSV paths are relative to.")
_flag(("make_shards",), flags.DEFINE_integer, "num_shards", 16, "number of TFRecord files.")
_flag(("make_shards",), flags.DEFINE_integer, "short_side", 256, "resize frames to this short side (0: keep).")
_flag(("make_shards",), flags.DEFINE_float, "max_fps", 0, "keep at most this many frames per second (0: all).")
_flag(("make_shards",), flags.DEFINE_integer, "frames_per_video", 0,
      "keep this many frames of each video, at the centres of as many equal segments (0: every frame).")
_flag(("make_shards",), flags.DEFINE_integer, "jpeg_quality", 90, "JPEG quality of the stored frames.")
_flag(("make_shards",), flags.DEFINE_integer, "workers", max(1, os.cpu_count() or 1), "parallel processes.")
_flag(("make_shards",), flags.DEFINE_string, "label_map", None, "existing labels.txt to reuse (e.g. train's for val).")
_flag(("make_shards",), flags.DEFINE_integer, "shuffle_seed", 0, "seed of the video -> shard assignment.")
for _command in _WITH_CONFIG:
  COMMAND_FLAGS[_command].add("config")


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


def _compile_only_host() -> None:
  """Host set-up for compiling for chips this machine does not have (``plan --topology=v5e:2x2``, ``h100:8``)."""
  import jax
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # No metadata server to ask: this is not a TPU VM.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # Compile-only: no chip to lock; other plans may run.
  if not os.environ.get("JAX_PLATFORMS") and not jax.config.jax_platforms:
    # Host-side work only (shapes, meshes): never claim this machine's own accelerator (a TPU VM in use).
    jax.config.update("jax_platforms", "cpu")


def _official_defaults():
  from vfocal_jax.configs import default  # pylint: disable=import-outside-toplevel
  return default.get_config()


def _required(name: str, why: str) -> str:
  value = getattr(FLAGS, name)
  if not value:
    raise errors.FlagError(f"--{name} is required: {why}")
  return value


def run_command(command: str, config, *, overrides: frozenset[str]) -> None:
  """Runs one command: resolves what the flags name (config, artifact) once, then calls the library with values."""
  from vfocal_jax import resolve  # pylint: disable=import-outside-toplevel
  user = resolve.UserConfig(config, given=FLAGS["config"].present > 0, overrides=overrides)
  if command == "make_shards":
    from vfocal_jax.data import make_shards
    make_shards.make_shards(_required("csv", "the `path,label` list of videos"),
                            _required("output_dir", "where the shards go"), FLAGS.num_shards,
                            video_root=FLAGS.video_root, short_side=FLAGS.short_side or None,
                            max_fps=FLAGS.max_fps or None, jpeg_quality=FLAGS.jpeg_quality,
                            frames_per_video=FLAGS.frames_per_video, workers=FLAGS.workers,
                            label_map=FLAGS.label_map, shuffle_seed=FLAGS.shuffle_seed)
    return
  from vfocal_jax import artifacts  # pylint: disable=import-outside-toplevel
  artifacts.model_kwargs(config.model)  # Names a bad model field before anything runs.
  if command == "summary":
    from vfocal_jax import summary
    summary.print_summary(config.model, num_frames=config.num_frames, image_size=config.image_size)
  elif command == "plan":
    if FLAGS.topology not in (None, "", "local"):
      _compile_only_host()
    from vfocal_jax import plan
    plan.run(config, topology=FLAGS.topology, json_path=FLAGS.json, search_batch=FLAGS.search_batch,
             measure=FLAGS.measure, pipeline_clips_per_core=FLAGS.pipeline_clips_per_core)
  elif command == "convert":
    from vfocal_jax.convert import cli
    cli.run(config=config if user.given else _official_defaults(), check_model=user.given, pth=FLAGS.pth,
            output_dir=FLAGS.output_dir, variant=FLAGS.variant, to_torch=FLAGS.to_torch, checkpoint=FLAGS.checkpoint, workdir=FLAGS.workdir,
            allow_partial=FLAGS.allow_partial, imagenet=FLAGS.imagenet, labels=FLAGS.labels)
  elif command == "export":
    from vfocal_jax.export import writer
    if not (user.given or overrides):  # Float32 and everything from the card.
      user = resolve.UserConfig()
    writer.check_output_dir(FLAGS.output_dir, FLAGS.overwrite)  # Before minutes of loading and lowering.
    writer.run(resolve.artifact(user, checkpoint=FLAGS.checkpoint, workdir=FLAGS.workdir),
               output_dir=FLAGS.output_dir, overwrite=FLAGS.overwrite)
  else:
    _init_distributed()
    if command == "train":
      from vfocal_jax import train
      train.train_and_evaluate(config, _required("workdir", "checkpoints and metrics go there"),
                               checkpoint=FLAGS.checkpoint)
    elif command == "eval":
      from vfocal_jax import evaluate
      evaluate.evaluate_checkpoint(resolve.evaluation(user, checkpoint=FLAGS.checkpoint, workdir=FLAGS.workdir),
                                   workdir=FLAGS.workdir)
    elif command == "predict":
      from vfocal_jax import predict
      videos = predict.read_videos(FLAGS.video)  # A bad list is named before minutes of loading.
      loaded = (resolve.exported(user, FLAGS.exported) if FLAGS.exported else
                resolve.artifact(user, checkpoint=FLAGS.checkpoint, workdir=FLAGS.workdir))
      predict.run(loaded, videos=videos, labels=FLAGS.labels, output_csv=FLAGS.output_csv)
    elif command == "visualize":
      from vfocal_jax import visualize
      loaded = resolve.artifact(user, checkpoint=FLAGS.checkpoint, workdir=FLAGS.workdir)
      visualize.run(loaded, videos=FLAGS.video, output_dir=FLAGS.output_dir, labels=FLAGS.labels)


def check_command_flags(command: str, argv: list[str]) -> None:
  """A flag given on the command line that ``command`` does not take is a user error naming it and its commands."""
  takes = COMMAND_FLAGS[command]
  given = [name for name in sorted(set().union(*COMMAND_FLAGS.values())) if FLAGS[name].present]
  if "config" not in takes and any(a.startswith("--config.") for a in argv):
    given.append("config")
  for name in given:
    if name not in takes:
      owners = [c for c in COMMANDS if name in COMMAND_FLAGS[c]]
      raise errors.UserError(f"--{name} is a flag of {', '.join(owners)}, not of {command} "
                             f"(its flags: {', '.join('--' + f for f in sorted(takes))})")


def _checked_config():
  """``--config``'s ConfigDict; a config file whose ``get_config()`` returns something else is a ConfigError."""
  config = FLAGS.config
  if not isinstance(config, ml_collections.ConfigDict):
    raise errors.ConfigError(f"{FLAGS['config'].config_filename}: get_config() returned a {type(config).__name__}, "
                             "expected an ml_collections.ConfigDict")
  return config


def main(argv: list[str]) -> None:
  command = argv[1] if len(argv) > 1 else "train"
  if len(argv) > 2 or command not in COMMANDS:
    _flag_error(ValueError(f"unknown command {' '.join(argv[1:])!r}; expected one of {', '.join(COMMANDS)}"))
  try:
    check_command_flags(command, sys.argv)
    run_command(command, _checked_config() if command in _WITH_CONFIG else None,
                overrides=explicit_overrides(sys.argv))
  except errors.UserError as e:
    if FLAGS.traceback:
      raise
    hint = "  (--traceback shows where)" if e.exit_status == EXIT_USER_ERROR else ""
    print(f"error: {str(e).strip()}{hint}", file=sys.stderr)
    sys.exit(e.exit_status)


def run(argv: list[str] | None = None) -> None:
  """The console entry point (``vfocal``); ``argv`` replaces ``sys.argv`` (``python -m vfocal_jax.data.make_shards``)."""
  logging.set_verbosity(logging.INFO)
  sys.argv = config_by_name(list(argv) if argv is not None else sys.argv)
  _define_config_flag()
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
