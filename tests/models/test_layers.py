"""Layers against references written out independently: SwiGLU's hand-written backward against
autodiff, RMSNorm, RoPE and the split-contraction product against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import ModelConfig
from models.layers import RMSNorm, apply_rope, rope_inv_freq, split_k_product, swiglu

CFG = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_swiglu_backward_matches_autodiff(dtype, tol):
  """The hand-written backward against autodiff of silu(gate) * up in float32."""
  kg, ku, kd = jax.random.split(jax.random.key(3), 3)
  gate, up, dout = (3.0 * jax.random.normal(k, (4, 8, 32)) for k in (kg, ku, kd))
  ref = lambda g, u: jax.nn.silu(g) * u
  out, vjp = jax.vjp(swiglu, gate.astype(dtype), up.astype(dtype))
  ref_out, ref_vjp = jax.vjp(ref, gate, up)
  assert out.dtype == dtype
  np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, rtol=tol, atol=tol)
  for got, want in zip(vjp(dout.astype(dtype)), ref_vjp(dout)):
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tol, atol=tol * float(jnp.abs(want).max()))


def test_rms_norm_matches_numpy():
  norm = RMSNorm(CFG, rngs=nnx.Rngs(0))
  norm.scale[...] = jnp.linspace(0.5, 1.5, CFG.d_model)
  x = 3.0 * np.random.default_rng(0).standard_normal((2, 5, CFG.d_model)).astype(np.float32)
  want = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + CFG.norm_eps) * np.linspace(0.5, 1.5, CFG.d_model)
  np.testing.assert_allclose(norm(jnp.asarray(x)), want, rtol=1e-5)


def test_rope_rotates_pairs_of_halves_by_position_times_frequency():
  hd = CFG.resolved_head_dim
  x = np.random.default_rng(1).standard_normal((1, 3, 2, hd)).astype(np.float32)
  pos = np.array([[0, 1, 7]])
  inv = 1.0 / CFG.rope_theta ** (np.arange(0, hd, 2) / hd)
  np.testing.assert_allclose(rope_inv_freq(CFG), inv, rtol=1e-6)
  angle = pos[..., None, None] * inv  # [1, 3, 1, hd/2]
  x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
  want = np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)], -1)
  np.testing.assert_allclose(apply_rope(jnp.asarray(x), jnp.asarray(pos), rope_inv_freq(CFG)), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("x_shape,w_shape,n_contract,splits", [
    ((2, 1, 32), (32, 4, 3, 8), 1, 4),   # fused q/k/v: [B, T, D] x [D, K, H/K + 2, hd]
    ((2, 1, 4, 8), (4, 8, 32), 2, 2),    # output: [B, T, H, hd] x [H, hd, D], two contracted axes
    ((3, 1, 64), (64, 32), 1, 8),        # down: [B, T, F] x [F, D]
    ((2, 1, 64), (64, 32), 1, 1)])       # no split: the plain product
def test_split_k_product_matches_numpy(dtype, tol, x_shape, w_shape, n_contract, splits):
  rng = np.random.default_rng(1)
  x, w = rng.standard_normal(x_shape).astype(np.float32), rng.standard_normal(w_shape).astype(np.float32)
  x, w = (np.asarray(jnp.asarray(a, dtype), np.float64) for a in (x, w))  # the values the product sees
  want = np.tensordot(x, w, n_contract)
  got = split_k_product(jnp.asarray(x, dtype), jnp.asarray(w, dtype), n_contract, splits)
  assert got.shape == want.shape and got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol * np.abs(want).max())


def test_split_k_product_refuses_splits_that_do_not_divide():
  with pytest.raises(ValueError, match="splits=3"):
    split_k_product(jnp.ones((2, 1, 32)), jnp.ones((32, 8)), 1, 3)
  with pytest.raises(ValueError, match="share 1 contracted"):
    split_k_product(jnp.ones((2, 1, 32)), jnp.ones((16, 8)), 1, 2)
