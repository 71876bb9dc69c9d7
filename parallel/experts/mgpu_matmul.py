"""Grouped matmuls on Hopper GPUs through the Mosaic GPU kernels that JAX ships.

`jax.experimental.pallas.ops.gpu` holds two persistent (one program per SM) warpgroup-MMA
kernels written with Pallas' Mosaic GPU backend:

  ragged_dot             [M, K] rows sorted by group x [G, K, N] -> [M, N]; with `transpose_rhs`
                         the weights are read as [G, N, K] (the input gradient, W^T, without a copy)
  transposed_ragged_dot  [M, K] x [M, N] -> [G, K, N]: the per-group x_g^T y_g (the weight gradient)

Here they become one differentiable grouped matmul (custom VJP: forward and input gradient on the
first, weight gradient on the second). Each kernel accumulates in float32 on the tensor cores and
writes the inputs' dtype (bf16 in practice; both operands must share it). Rows past the sum of the
group sizes are written by no kernel: they are zeroed here, in the output and in the input
gradient, so the op keeps `grouped_matmul.py`'s contract.

The kernels are imported from JAX itself, so each JAX version brings the kernels that match its
own Pallas API. They run on GPUs of compute capability 9.x only (warpgroup MMA, TMA). The default
tilings are the best of `bench/mgpu_sweep.py` on an H100 at the `moe` preset's shapes
(BENCHMARKS.md: 70-92% of a dense matmul of the same FLOPs) and can be set per call. The VJP
wiring is tested on CPUs with `xla_kernels` (`jax.lax.ragged_dot`) in the kernels' place
(`kernels=`); the kernels themselves are checked against `xla_kernels` in float32 by the benchmark.

Every tile of the [M, ...] rows is computed, the rows past the groups included: a buffer with
padding rows (the expert-parallel receive buffers) pays for them, which is why `auto` picks these
kernels for the one-device dropless layer only (grouped_matmul.py).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class TileConfig:
  """One kernel's tiling: output tile block_m x block_n, K steps of block_k, `steps` stages of
  operands in flight (shared memory), `grid_block_n` output tiles per column band (L2 reuse)."""

  block_m: int = 128
  block_n: int = 128
  block_k: int = 64
  steps: int = 5
  grid_block_n: int = 8

  def kwargs(self) -> dict:
    return dict(block_m=self.block_m, block_n=self.block_n, block_k=self.block_k,
                max_concurrent_steps=self.steps, grid_block_n=self.grid_block_n)


class Configs(NamedTuple):
  """Tilings of the three products of one grouped matmul."""

  forward: TileConfig = TileConfig()
  rows_grad: TileConfig = TileConfig()
  weight_grad: TileConfig = TileConfig(grid_block_n=1)


def on_hopper() -> bool:
  """Whether the default device is a GPU these kernels run on (compute capability 9.x)."""
  return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")


class Kernels(NamedTuple):
  """The three products, each (a, b, group_sizes) -> array:
  forward [M, K] x [G, K, N] -> [M, N]; rows_grad [M, N] x [G, K, N] -> [M, K] (b read
  transposed); weight_grad [M, K] x [M, N] -> [G, K, N] (the per-group a_g^T b_g)."""

  forward: Callable
  rows_grad: Callable
  weight_grad: Callable


def mosaic_kernels(configs: Configs = Configs()) -> Kernels:
  """JAX's Mosaic GPU kernels at the given tilings (GPU only: imported when called)."""
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu  # noqa: PLC0415

  def forward(a, b, sizes):
    return ragged_dot_mgpu.ragged_dot(a, b, group_sizes=sizes, **configs.forward.kwargs())

  def rows_grad(a, b, sizes):
    return ragged_dot_mgpu.ragged_dot(a, b, group_sizes=sizes, transpose_rhs=True, **configs.rows_grad.kwargs())

  def weight_grad(a, b, sizes):
    return transposed_ragged_dot_mgpu.transposed_ragged_dot(a, b, group_sizes=sizes, **configs.weight_grad.kwargs())

  return Kernels(forward, rows_grad, weight_grad)


def xla_kernels(precision=None) -> Kernels:
  """The same three products in XLA (`jax.lax.ragged_dot`): any backend, any dtype; the reference
  the kernels are checked against, and their stand-in in CPU tests."""

  def forward(a, b, sizes):
    return jax.lax.ragged_dot(a, b, sizes, precision=precision)

  def rows_grad(a, b, sizes):
    return jax.lax.ragged_dot(a, jnp.swapaxes(b, 1, 2), sizes, precision=precision)

  def weight_grad(a, b, sizes):
    dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((0,), (0,)), ((), ())),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    return jax.lax.ragged_dot_general(a, b, sizes, ragged_dot_dimension_numbers=dims, precision=precision)

  return Kernels(forward, rows_grad, weight_grad)


def _check_tiles(k: int, n: int, configs: Configs) -> None:
  """The kernels' shape rules, as errors that say which tiling and width disagree."""
  bad = [f"K={k} is not a multiple of {name}.block_k={c.block_k}"
         for name, c, kk in (("forward", configs.forward, k), ("rows_grad", configs.rows_grad, n)) if kk % c.block_k]
  w = configs.weight_grad
  bad += [f"{dim}={v} is not a multiple of weight_grad.{b}={t}"
          for dim, v, b, t in (("K", k, "block_m", w.block_m), ("N", n, "block_n", w.block_n)) if v % t]
  if bad:
    raise ValueError(f"the mgpu grouped matmul [M, {k}] x [G, {k}, {n}]: " + "; ".join(bad))


def _zero_past_groups(x_MxN: jax.Array, sizes_G: jax.Array) -> jax.Array:
  live = jnp.arange(x_MxN.shape[0], dtype=jnp.int32) < jnp.sum(sizes_G)
  return jnp.where(live[:, None], x_MxN, jnp.zeros((), x_MxN.dtype))


def grouped_matmul_mgpu(rows_MxK: jax.Array, w_GxKxN: jax.Array, group_sizes_G: jax.Array,
                        configs: Configs = Configs(), kernels: Kernels | None = None) -> jax.Array:
  """[M, K] rows (group g's rows contiguous, groups in order) x [G, K, N] -> [M, N] in the rows'
  dtype, differentiable in rows and weights. `kernels` replaces the Mosaic GPU kernels (tests)."""
  if rows_MxK.dtype != w_GxKxN.dtype:
    raise ValueError(f"the mgpu grouped matmul wants rows and weights of one dtype, got {rows_MxK.dtype} and "
                     f"{w_GxKxN.dtype}")
  if kernels is None:
    _check_tiles(rows_MxK.shape[1], w_GxKxN.shape[2], configs)
  ops = kernels or mosaic_kernels(configs)

  @jax.custom_vjp
  def gmm(rows, w, sizes):
    return _zero_past_groups(ops.forward(rows, w, sizes), sizes)

  def fwd(rows, w, sizes):
    return gmm(rows, w, sizes), (rows, w, sizes)

  def bwd(res, d_out):
    rows, w, sizes = res
    d_out = _zero_past_groups(d_out.astype(rows.dtype), sizes)
    d_rows = _zero_past_groups(ops.rows_grad(d_out, w, sizes), sizes)
    return d_rows, ops.weight_grad(rows, d_out, sizes).astype(w.dtype), None

  gmm.defvjp(fwd, bwd)
  return gmm(rows_MxK, w_GxKxN, group_sizes_G.astype(jnp.int32))
