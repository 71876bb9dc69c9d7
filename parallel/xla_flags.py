"""XLA flags shardlab sets by default on NVIDIA GPUs (measured in BENCHMARKS.md).

The latency-hiding scheduler overlaps FSDP all-gathers and gradient reduce-scatters with
compute; capping the combined collective size at 256 MiB keeps per-layer collectives small
enough to overlap instead of one large reduction at the end of the backward pass.
"""

from __future__ import annotations

import importlib.util
import os

GPU_FLAGS = {
    # cuBLAS for every matmul: about 1 ms per step faster on the `1b` preset than XLA's Triton
    # GEMM fusions, which fuse a little elementwise work into slower matmul kernels.
    "xla_gpu_enable_triton_gemm": "false",
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    "xla_gpu_all_reduce_combine_threshold_bytes": str(256 * 2**20),
    "xla_gpu_reduce_scatter_combine_threshold_bytes": str(256 * 2**20),
    "xla_gpu_all_gather_combine_threshold_bytes": str(256 * 2**20),
}


def _has_cuda_plugin() -> bool:
  return any(importlib.util.find_spec(name) for name in ("jax_cuda13_plugin", "jax_cuda12_plugin"))


def apply_default_flags() -> None:
  """Adds the GPU defaults to XLA_FLAGS (before JAX starts); flags the user already set win."""
  if not _has_cuda_plugin() or os.environ.get("JAX_PLATFORMS", "") == "cpu":
    return
  current = os.environ.get("XLA_FLAGS", "")
  extra = [f"--{k}={v}" for k, v in GPU_FLAGS.items() if f"--{k}=" not in current]
  os.environ["XLA_FLAGS"] = " ".join([*extra, current]).strip()
