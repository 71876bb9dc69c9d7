"""The `mgpu` grouped matmul's differentiation (parallel/experts/mgpu_matmul.py) on CPUs.

The Mosaic GPU kernels run on Hopper GPUs only (the benchmark checks them against a float32
reference there). Here `jax.lax.ragged_dot` stands in for them, with the rows past the groups
filled with NaN as the real kernels leave them unwritten, and the op's forward and both gradients
are compared with a per-group numpy computation: which operand each product reads transposed, the
zeroed tail rows, an empty group."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallel.experts.mgpu_matmul import Configs, Kernels, TileConfig, grouped_matmul_mgpu, xla_kernels

SIZES = np.array([3, 0, 5, 1])  # group 1 empty; 9 rows in groups, 2 past them
M, K, N = 11, 6, 7


def _garbage_tail(x, sizes):
  live = jnp.arange(x.shape[0]) < jnp.sum(sizes)
  return jnp.where(live[:, None], x, jnp.nan)


def _stand_ins() -> Kernels:
  """XLA's products, with the tail rows of the two row-major outputs left as NaN."""
  xla = xla_kernels(jax.lax.Precision.HIGHEST)
  return Kernels(lambda a, b, sizes: _garbage_tail(xla.forward(a, b, sizes), sizes),
                 lambda a, b, sizes: _garbage_tail(xla.rows_grad(a, b, sizes), sizes),
                 xla.weight_grad)


def _numpy_reference(rows, w, d_out):
  """(out, d_rows, d_w) group by group in float64; rows past the groups give and get zeros."""
  rows, w, d_out = (np.asarray(a, np.float64) for a in (rows, w, d_out))
  out, d_rows, d_w = np.zeros((M, N)), np.zeros((M, K)), np.zeros(w.shape)
  start = 0
  for g, n in enumerate(SIZES):
    sl = slice(start, start + n)
    out[sl] = rows[sl] @ w[g]
    d_rows[sl] = d_out[sl] @ w[g].T
    d_w[g] = rows[sl].T @ d_out[sl]
    start += n
  return out, d_rows, d_w


def test_forward_and_gradients_match_per_group_products():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  rows = jax.random.normal(k1, (M, K), jnp.float32)
  w = jax.random.normal(k2, (len(SIZES), K, N), jnp.float32)
  d_out = jax.random.normal(k3, (M, N), jnp.float32)
  sizes = jnp.asarray(SIZES, jnp.int32)
  out, vjp = jax.vjp(lambda r, w: grouped_matmul_mgpu(r, w, sizes, kernels=_stand_ins()), rows, w)
  d_rows, d_w = vjp(d_out)
  want = _numpy_reference(rows, w, d_out)
  for got, ref in zip((out, d_rows, d_w), want):
    assert np.all(np.isfinite(np.asarray(got)))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


def test_mixed_dtypes_are_refused():
  with pytest.raises(ValueError, match="one dtype"):
    grouped_matmul_mgpu(jnp.zeros((4, K), jnp.bfloat16), jnp.zeros((2, K, N), jnp.float32), jnp.array([2, 2]),
                        kernels=_stand_ins())


def test_widths_off_the_tiles_are_refused_before_any_kernel():
  tile = TileConfig(block_m=128, block_n=128, block_k=64)
  with pytest.raises(ValueError, match=r"K=96 is not a multiple of forward.block_k=64.*"
                                       r"N=200 is not a multiple of weight_grad.block_n=128"):
    grouped_matmul_mgpu(jnp.zeros((8, 96), jnp.bfloat16), jnp.zeros((2, 96, 200), jnp.bfloat16), jnp.array([4, 4]),
                        Configs(tile, tile, tile))
