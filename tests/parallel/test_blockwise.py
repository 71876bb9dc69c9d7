"""The blockwise pieces every ring-style op merges (`parallel/attention/blockwise.py`) against
dense softmax attention: a sequence's keys split in two blocks, each block's partial output and
LSE merged, equal the whole softmax; each block's backward from the full rows' LSE and delta,
summed, equals the dense gradients. On GPUs, the cuDNN calls (`cudnn_blocks.py`) against the XLA
blocks and twins (`xla_kernels.py`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallel.attention import cudnn_blocks, xla_kernels
from parallel.attention.blockwise import F32, NEG, attention_mask, block_backward, block_forward, merge
from tests.reference import assert_close

B, L, H, K, D = 2, 12, 4, 2, 8


def _dense(q, k, v, mask):
  """Plain softmax attention, GQA by repeating K/V heads: [B, L, H, D]."""
  k, v = (jnp.repeat(x, H // K, axis=2) for x in (k, v))
  s = jnp.einsum("bqhd,bshd->bhqs", q, k) * D ** -0.5
  s = jnp.where(mask[:, None], s, -jnp.inf)
  return jnp.einsum("bhqs,bshd->bqhd", jax.nn.softmax(s, axis=-1), v)


def _inputs():
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (B, L, H, D))
  k, v = jax.random.normal(ks[1], (B, L, K, D)), jax.random.normal(ks[2], (B, L, K, D))
  seg = jnp.asarray(np.repeat([[1] * 5 + [2] * 7], B, axis=0), jnp.int32)
  return q, k, v, seg, jax.random.normal(ks[3], (B, L, H, D))


def test_two_blocks_merged_equal_dense_attention_and_its_gradients():
  q, k, v, seg, do = _inputs()
  idx = jnp.arange(L)
  full = attention_mask(idx, idx, seg, seg)
  want_o, vjp = jax.vjp(lambda q, k, v: _dense(q, k, v, full), q, k, v)
  want = vjp(do)
  halves = [slice(0, L // 2), slice(L // 2, L)]
  o, lse = jnp.zeros(q.shape, F32), jnp.full(q.shape[:3], NEG, F32)
  for h in halves:
    ob, lb = block_forward(q, k[:, h], v[:, h], attention_mask(idx, idx[h], seg, seg[:, h]), D ** -0.5)
    o, lse = merge(o, lse, ob, lb)
  assert_close(o, want_o, what="merged output")
  delta = jnp.sum(do * o, axis=-1)
  dq, dk, dv = jnp.zeros(q.shape), [], []
  for h in halves:
    bq, bk, bv = block_backward(q, k[:, h], v[:, h], attention_mask(idx, idx[h], seg, seg[:, h]), D ** -0.5, lse,
                                delta, do)
    dq, dk, dv = dq + bq, dk + [bk], dv + [bv]
  assert_close((dq, jnp.concatenate(dk, 1), jnp.concatenate(dv, 1)), want, what="blockwise gradients")


@pytest.mark.skipif(not cudnn_blocks.available(), reason="cuDNN flash attention needs an NVIDIA GPU")
def test_cudnn_blocks_equal_the_xla_blocks():
  q, k, v, _, do = (x.astype(jnp.bfloat16) for x in _inputs())
  idx = jnp.arange(L)
  for causal in (True, False):
    mask = attention_mask(idx, idx, None, None, causal)
    o, lse = cudnn_blocks.block_forward(q, k, v, causal, D ** -0.5)
    want_o, want_lse = block_forward(q, k, v, mask, D ** -0.5)
    assert_close((o.astype(F32), lse), (want_o, want_lse), dtype=jnp.bfloat16, what="cuDNN block forward")
    delta = jnp.sum(do.astype(F32) * want_o, axis=-1)
    got = cudnn_blocks.block_backward(q, k, v, causal, D ** -0.5, o, lse, do)
    assert_close(got, block_backward(q, k, v, mask, D ** -0.5, want_lse, delta, do), dtype=jnp.bfloat16,
                 what="cuDNN block backward")


@pytest.mark.skipif(not cudnn_blocks.available(), reason="cuDNN flash attention needs an NVIDIA GPU")
def test_cudnn_padded_blocks_equal_their_xla_twins():
  """Padding masks (rows < q_len against keys < kv_len, per batch row, one row empty): equal inside
  the mask; outside it cuDNN's results are undefined and callers mask them."""
  q, k, v, _, do = (x.astype(jnp.bfloat16) for x in _inputs())
  q_len, kv_len = jnp.asarray([7, 0], jnp.int32), jnp.asarray([5, 0], jnp.int32)
  rows = (jnp.arange(L)[None, :] < q_len[:, None])[..., None, None]
  keys = (jnp.arange(L)[None, :] < kv_len[:, None])[..., None, None]
  o, lse = cudnn_blocks.padded_forward(q, k, v, q_len, kv_len, D ** -0.5)
  want_o, want_lse = xla_kernels.padded_forward(q, k, v, q_len, kv_len, D ** -0.5)
  inside = lambda x, where: jnp.where(where, x.astype(F32), 0)
  assert_close((inside(o, rows), inside(lse, rows[..., 0])), (inside(want_o, rows), inside(want_lse, rows[..., 0])),
               dtype=jnp.bfloat16, what="cuDNN padded forward")
  # The backward takes the rows' final statistics, finite on every row (as from the whole softmax).
  final = xla_kernels.block_forward(q, k, v, False, D ** -0.5)
  got = cudnn_blocks.padded_backward(q, k, v, q_len, kv_len, D ** -0.5, *final, do)
  want = xla_kernels.padded_backward(q, k, v, q_len, kv_len, D ** -0.5, *final, do)
  assert_close([inside(x, w) for x, w in zip(got, (rows, keys, keys))],
               [inside(x, w) for x, w in zip(want, (rows, keys, keys))], dtype=jnp.bfloat16,
               what="cuDNN padded backward")
