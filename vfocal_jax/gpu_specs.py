"""NVIDIA GPUs for ``plan``: the published figures of each chip and its compile-only target description.

``GPUS``: memory, HBM bandwidth, dense bf16 peak, SM count and NVLink
bandwidth per GPU, keyed by the name ``plan --topology`` takes (``h100:8``).
The rates are NVIDIA's datasheets (``source``): peak bf16 is the dense
Tensor Core figure (the datasheets print twice that "with sparsity"), NVLink
the total per GPU (both directions). ``hbm_bytes`` is the device memory the
driver reports (``cudaMemGetInfo``'s total, XLA's ``device_memory_size`` of
the same GPU: https://github.com/openxla/xla/tree/main/xla/backends/gpu/target_config/specs),
a little under the datasheet's "80 GB" etc.

``target_config`` writes the ``GpuTargetConfigProto`` (text form) that
``jax.experimental.topologies.get_topology_desc(platform='cuda', ...)``
needs to hand out compile-only GPUs: the CUDA plugin (``jax[cuda12]``) must
be installed and ``JAX_PLATFORMS=cpu`` set before JAX starts (the plugin then
skips its driver check). ``devices`` parses ``'h100:8'`` (8 GPUs on one host)
or ``'h100:2x8'`` (2 hosts of 8) and returns those devices; nothing runs.
"""
from __future__ import annotations

import dataclasses
import re

from vfocal_jax import errors

GiB = 2 ** 30
_H100 = "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet"
_A100 = ("https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
         "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf")
_H200 = "https://www.nvidia.com/en-us/data-center/h200/"


@dataclasses.dataclass(frozen=True)
class GpuSpec:
  name: str                       # plan's name: h100, a100, a100-40gb, h200.
  device_kind: str                # What jax.Device.device_kind reads (the driver's device name).
  memory: str                     # The datasheet's memory: "80 GB HBM3".
  hbm_bytes: int                  # Device memory the driver reports (XLA's device_memory_size).
  peak_bf16_flops: float          # Dense bf16 Tensor Core FLOP/s (datasheet, without sparsity).
  hbm_bytes_per_second: float     # Datasheet memory bandwidth.
  nvlink_bytes_per_second: float  # NVLink bandwidth per GPU, both directions (datasheet).
  sm_count: int
  fpus_per_sm: int                # FP32 lanes per SM.
  compute_capability: tuple[int, int]
  clock_rate_ghz: float           # Boost clock.
  l2_cache_bytes: int
  shared_memory_per_sm: int
  shared_memory_per_block_optin: int
  source: str

  @property
  def hbm_gib(self) -> float:
    return self.hbm_bytes / GiB


GPUS: dict[str, GpuSpec] = {
    "h100": GpuSpec("h100", "NVIDIA H100 80GB HBM3", "80 GB HBM3", 84942979072, 989e12, 3.35e12, 900e9,
                    132, 128, (9, 0), 1.98, 50 * 2 ** 20, 233472, 232448, _H100 + " (H100 SXM)"),
    "a100": GpuSpec("a100", "NVIDIA A100-SXM4-80GB", "80 GB HBM2e", 85100068864, 312e12, 2.039e12, 600e9,
                    108, 64, (8, 0), 1.41, 40 * 2 ** 20, 167936, 166912, _A100 + " (A100 80GB SXM)"),
    "a100-40gb": GpuSpec("a100-40gb", "NVIDIA A100-SXM4-40GB", "40 GB HBM2", 42331013120, 312e12, 1.555e12, 600e9,
                         108, 64, (8, 0), 1.41, 40 * 2 ** 20, 167936, 166912, _A100 + " (A100 40GB SXM)"),
    "h200": GpuSpec("h200", "NVIDIA H200 141GB HBM3e", "141 GB HBM3e", 151397597184, 989e12, 4.8e12, 900e9,
                    132, 128, (9, 0), 1.98, 50 * 2 ** 20, 233472, 232448, _H200 + " (H200 SXM)"),
}
ALIASES = {"h100-80gb": "h100", "a100-80gb": "a100", "h200-141gb": "h200"}

# JAX's GPU client takes this fraction of device memory by default (XLA_PYTHON_CLIENT_MEM_FRACTION).
DEFAULT_MEM_FRACTION = 0.75


def gpu_spec(name_or_kind: str) -> GpuSpec | None:
  """The spec of a plan name (``'h100'``) or of a ``device_kind`` (``'NVIDIA H100 80GB HBM3'``)."""
  key = name_or_kind.lower()
  key = ALIASES.get(key, key)
  if key in GPUS:
    return GPUS[key]
  return next((g for g in GPUS.values() if g.device_kind == name_or_kind), None)


def target_config(gpu: GpuSpec) -> str:
  """The ``GpuTargetConfigProto`` in text form for compile-only devices of ``gpu``."""
  major, minor = gpu.compute_capability
  return "\n".join([
      "gpu_device_info {",
      "  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152",
      f"  shared_memory_per_core: {gpu.shared_memory_per_sm} threads_per_core_limit: 2048",
      f"  core_count: {gpu.sm_count} fpus_per_core: {gpu.fpus_per_sm}",
      "  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535",
      f"  memory_bandwidth: {int(gpu.hbm_bytes_per_second)} l2_cache_size: {gpu.l2_cache_bytes}",
      f"  clock_rate_ghz: {gpu.clock_rate_ghz} device_memory_size: {gpu.hbm_bytes}",
      f"  shared_memory_per_block_optin: {gpu.shared_memory_per_block_optin}",
      f"  cuda_compute_capability {{ major: {major} minor: {minor} }}",
      "  registers_per_core_limit: 65536 registers_per_block_limit: 65536",
      "}",
      'platform_name: "CUDA"',
      "dnn_version_info { major: 9 minor: 8 patch: 0 }",
      "runtime_version { major: 12 minor: 9 }",
      f'device_description_str: "{gpu.device_kind}"',
      ""])


_TOPOLOGY = re.compile(r"^([a-z0-9\-]+):(?:(\d+)x)?(\d+)$")


def parse_topology(topology: str) -> tuple[GpuSpec, int, int] | None:
  """``'h100:8'`` -> (H100, 1 host, 8 GPUs per host); ``'a100:2x8'`` -> 2 hosts of 8. None if not a GPU name."""
  m = _TOPOLOGY.match(topology.strip().lower())
  if not m:
    return None
  gpu = gpu_spec(m.group(1))
  if gpu is None:
    return None
  hosts, per_host = int(m.group(2) or 1), int(m.group(3))
  if hosts < 1 or per_host < 1:
    raise errors.FlagError(f"--topology={topology}: needs at least one host and one GPU per host.")
  return gpu, hosts, per_host


def is_gpu_topology(topology: str | None) -> bool:
  if not topology:
    return False
  name = topology.split(":")[0].strip().lower()
  return ALIASES.get(name, name) in GPUS


def devices(topology: str) -> list:
  """Compile-only CUDA devices for ``topology`` (``'h100:8'``); FlagError (one line) without the CUDA plugin."""
  parsed = parse_topology(topology)
  if parsed is None:
    raise errors.FlagError(f"--topology={topology}: expected GPU:N or GPU:HOSTSxN with GPU one of "
                           f"{', '.join(sorted(GPUS))} (e.g. h100:8).")
  gpu, hosts, per_host = parsed
  from jax.experimental import topologies
  try:
    desc = topologies.get_topology_desc(platform="cuda", topology=f"1x{hosts}x{per_host}",
                                        target_config=target_config(gpu))
  except Exception as e:  # The CUDA plugin missing, ...
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise errors.FlagError(f"--topology={topology}: no compile-only {gpu.device_kind} devices could be made "
                           f"({first}); needs the CUDA plugin (pip install \"jax[cuda12]==0.10.2\", or the [cuda12] "
                           "extra) and JAX_PLATFORMS=cpu set before JAX starts.") from None
  return list(desc.devices)
