"""Test-wide setup: 8 simulated CPU devices, quiet TensorFlow, a shared XLA compilation cache; shared fixtures.

The shared set-up as plain functions (tiny configs, the train stream, free ports, the worker subprocess) is
tests/helpers.py; the fixtures here are built on it.
"""
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tests import `benchmarks` (the PyTorch reference model) as well as the library; tests/ itself is on the
# path through pytest (helpers, reference_views, numbered_videos, gcs_emulator).
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# Must be set before jax is imported anywhere; subprocesses inherit them.
# 8 simulated CPU devices, through JAX's own setting, so that a subprocess can ask for another count
# (JAX_NUM_CPU_DEVICES=1) and keep the XLA flags.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
# XLA's cheapest CPU compiles: the test models are tiny, so compiling dominates the suite. LLVM's cheap
# pipeline, and the elemental emitters instead of jax 0.10's fusion emitters: a tiny train step compiles
# in about 40% of the CPU time (benchmarks/compile_flags.py). No test asserts a time.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# libtpu is installed for the TPU-compile tests (`plan`): keep JAX on the CPU and keep libtpu
# from looking for a TPU VM's metadata server.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
# Many tests compile the same tiny train / eval steps (each restart of a run, each
# pytest-xdist worker): JAX's persistent cache compiles each program once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".pytest_cache", "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# pytest-xdist hands out whole modules (--dist loadscope in pyproject.toml: a module's fixtures, such as the
# storage emulator or a compiled reference, are built once) in collection order: the costliest modules go
# first, so that none of them starts last while the other worker idles (their costs: --durations=0, 2 cores).
COSTLIEST_FIRST = ("test_cloud_storage.py", "test_model.py", "test_train_resume.py", "test_train_step.py",
                   "test_train_multihost.py", "test_pod_scaling.py", "test_export.py", "test_periodic_eval.py",
                   "test_train_edges.py", "test_artifacts.py", "test_step_vs_torch.py", "test_preemption.py",
                   "test_resume_resize.py", "test_plan.py", "test_loss.py", "test_accumulation.py",
                   "test_temporal_layout.py", "test_visualize.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(COSTLIEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


# torch (independent references, real .pth files) and libtpu (TPU-slice compiles of `plan`) are test
# dependencies (requirements-test.txt), imported plainly by the tests: without them the run stops here, with
# the fix, instead of skipping what needs them.
TEST_DEPENDENCIES = ("torch", "libtpu")


def pytest_sessionstart(session):
  missing = [name for name in TEST_DEPENDENCIES if importlib.util.find_spec(name) is None]
  if missing:
    raise pytest.UsageError(f"the tests need {', '.join(missing)}: pip install -r requirements-test.txt")


@pytest.fixture(scope="module")
def one_torch_thread():
  """Tiny tensors: a second torch thread only spin-waits (on 2 busy cores, 0.4 s of CPU a step instead of 0.01 s)."""
  import torch  # pylint: disable=import-outside-toplevel
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture
def synthetic_eval(monkeypatch):
  """For this test, the loop's eval reads one synthetic batch instead of shards (``helpers.use_synthetic_eval``).

  A module takes it for every test with ``pytestmark = pytest.mark.usefixtures("synthetic_eval")``.
  """
  import helpers  # pylint: disable=import-outside-toplevel
  helpers.use_synthetic_eval(monkeypatch.setattr)


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """A Cloud Storage emulator on 127.0.0.1 (tests/gcs_emulator.py) for the module; its tests make the buckets.

  A server that cannot start is an error, not a skip.
  """
  from gcs_emulator import GcsEmulator  # pylint: disable=import-outside-toplevel
  with GcsEmulator(tmp_path_factory.mktemp("gcs")) as server:
    yield server
