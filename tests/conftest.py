"""Test-wide setup: 8 simulated CPU devices, quiet TensorFlow, a shared XLA compilation cache."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Must be set before jax is imported anywhere; subprocesses (the multi-host test) inherit them.
# LLVM's cheap pipeline: the test models are tiny, so compiling dominates (about a third less CPU time, measured
# on tests/test_predict.py); no test asserts a time.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# libtpu is installed for the TPU-compile tests (`plan`): keep JAX on the CPU and keep libtpu
# from looking for a TPU VM's metadata server.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
# Many tests compile the same tiny train / eval steps (each restart of a run, each
# pytest-xdist worker): JAX's persistent cache compiles each program once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".pytest_cache", "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
