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


# Serving adds these. A decode step multiplies one row per slot by every weight: XLA's dot merger
# joins the q/k/v (and gate/up) matmuls that share their input by concatenating their weights,
# which at one row costs a copy of those weights per step (batch-1 decode of `1b` on an H200:
# 1.85 ms per token with it, 1.55 without; BENCHMARKS.md).
SERVING_FLAGS = {"xla_disable_hlo_passes": "dot-merger"}


# Mixture-of-experts training adds these. The dropless `rounds` experts run their spill rounds in a
# while loop whose trip count depends on the routing; without command buffers for loops and
# conditionals the GPU runtime reads every such loop's predicate back to the host (gaps of up to
# 1 ms: 39 of the 342 ms of a `moe` step on an H200); with them the loops stay on the device.
# Every loop of the program is then captured, so dense runs keep XLA's own default.
DEVICE_LOOP_FLAGS = {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"}


def apply_default_flags(serving: bool = False, device_loops: bool = False) -> None:
  """Adds the GPU defaults to XLA_FLAGS (before JAX starts), with `serving` the decode ones and
  with `device_loops` the experts' ones; flags the user already set win."""
  if not _has_cuda_plugin() or os.environ.get("JAX_PLATFORMS", "") == "cpu":
    return
  current = os.environ.get("XLA_FLAGS", "")
  flags = {**GPU_FLAGS, **(SERVING_FLAGS if serving else {}), **(DEVICE_LOOP_FLAGS if device_loops else {})}
  extra = [f"--{k}={v}" for k, v in flags.items() if f"--{k}=" not in current]
  os.environ["XLA_FLAGS"] = " ".join([*extra, current]).strip()
