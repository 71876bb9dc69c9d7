"""The grouped matmul of dropless experts: rows sorted by group (expert) times each group's matrix.

  xla      `jax.lax.ragged_dot`: correct on every backend, slow on GPUs (BENCHMARKS.md).
  tokamax  `tokamax.ragged_dot` (a GPU Pallas kernel; JAX >= 0.11), when the package is importable.
  mgpu     JAX's own Mosaic GPU ragged-dot kernels (Hopper GPUs; `mgpu_matmul.py`); computes in the
           inputs' dtype whatever `out_dtype` asks (float32 accumulation inside the kernel).
  tiled    not a grouped matmul: the FFN as batched matmuls over expert-aligned tiles
           (`tiled.py`, chosen in `ffn.grouped_ffn`)
  rounds   not a grouped matmul: the FFN as batched matmuls over [E, C, D] slots in rounds
           (`rounds.py`, chosen in `ffn.grouped_ffn`): dense GEMM speed on GPUs, exact
  auto     mgpu for one device's bf16 dropless layer on a Hopper GPU, widths in 128s, else rounds on a
           GPU (expert-parallel buffers hold padding rows that mgpu would compute), else xla.
Rows past the sum of the group sizes come out zero (every implementation).
"""

from __future__ import annotations

import functools
import importlib.util

import jax
import jax.numpy as jnp

from configs.base import GROUPED_MATMULS
from parallel.experts.mgpu_matmul import grouped_matmul_mgpu, on_hopper


@functools.cache
def tokamax_available() -> bool:
  return importlib.util.find_spec("tokamax") is not None


def resolve(impl: str, backend: str | None = None, *, widths: tuple[int, ...] = (), one_device: bool = False,
            dtype=None, hopper: bool | None = None) -> str:
  """`auto` -> `mgpu` for `one_device`'s dropless layer in bf16 (`dtype`) on a Hopper GPU when
  every width in `widths` is a multiple of 128 (skew costs it nothing; BENCHMARKS.md), else
  `rounds` on a GPU (batched GEMMs at the dense rate, spill rounds under skew), else `xla`; other
  names unchanged. `hopper` (default: ask the device) says whether the GPU is one."""
  if impl not in GROUPED_MATMULS:
    raise ValueError(f"grouped matmul {impl!r}: choose one of {GROUPED_MATMULS}")
  if impl != "auto":
    return impl
  backend = backend or jax.default_backend()
  if backend != "gpu":
    return "xla"
  fits = one_device and dtype is not None and jnp.dtype(dtype) == jnp.bfloat16 and all(w % 128 == 0 for w in widths)
  return "mgpu" if fits and (on_hopper() if hopper is None else hopper) else "rounds"


def grouped_matmul(rows_MxD: jax.Array, w_GxDxF: jax.Array, group_sizes_G: jax.Array, impl: str = "xla",
                   out_dtype=None) -> jax.Array:
  """[M, D] rows (group g's rows contiguous, groups in order) x [G, D, F] -> [M, F], in `out_dtype`
  (default: the rows' dtype; float32 asks the kernel to accumulate and return float32)."""
  if rows_MxD.ndim != 2 or w_GxDxF.ndim != 3 or rows_MxD.shape[1] != w_GxDxF.shape[1]:
    raise ValueError(f"grouped matmul wants rows [M, D] and weights [G, D, F], got {rows_MxD.shape} and "
                     f"{w_GxDxF.shape}")
  if group_sizes_G.shape != (w_GxDxF.shape[0],):
    raise ValueError(f"group sizes {group_sizes_G.shape} must be ({w_GxDxF.shape[0]},)")
  impl = resolve(impl)
  if impl in ("tiled", "rounds"):
    raise ValueError(f"the {impl} implementation runs whole FFNs (ffn.grouped_ffn), not single grouped matmuls")
  sizes, out_dtype = group_sizes_G.astype(jnp.int32), jnp.dtype(out_dtype or rows_MxD.dtype)
  if impl == "mgpu":
    return grouped_matmul_mgpu(rows_MxD, w_GxDxF.astype(rows_MxD.dtype), sizes).astype(out_dtype)
  if impl == "tokamax":
    import tokamax  # noqa: PLC0415 (optional, GPU only)
    return tokamax.ragged_dot(rows_MxD, w_GxDxF, sizes, preferred_element_type=out_dtype)
  return jax.lax.ragged_dot(rows_MxD, w_GxDxF, sizes, preferred_element_type=out_dtype)
