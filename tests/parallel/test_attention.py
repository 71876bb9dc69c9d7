"""Dense attention (the `dense` strategy and the reference of every context-parallel method)
against plain softmax attention written out in numpy: GQA/MQA, causal, packed documents."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallel.attention.dense import dot_product_attention
from parallel.attention.dispatch import attend
from parallel.plan import single_device_plan
from tests.reference import check_against_reference


def numpy_attention(q, k, v, seg):
  """Softmax attention in float64 with K/V heads repeated for each query group."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  groups = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  L = q.shape[1]
  seg = np.asarray(seg)
  mask = np.tril(np.ones((L, L), bool))[None, None] & (seg[:, None, :, None] == seg[:, None, None, :])
  scores = np.where(mask, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", probs, v)


def _reference(q, k, v, seg):
  """The same in JAX (differentiable), checked against numpy_attention below."""
  groups = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  L = q.shape[1]
  mask = jnp.tril(jnp.ones((L, L), bool))[None, None] & (seg[:, None, :, None] == seg[:, None, None, :])
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1), v)


@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2), (8, 1)])
def test_dense_attention_gqa_matches_reference(heads, kv_heads):
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (2, 12, heads, 16))
  k = jax.random.normal(ks[1], (2, 12, kv_heads, 16))
  v = jax.random.normal(ks[2], (2, 12, kv_heads, 16))
  seg = jnp.asarray([[1] * 5 + [2] * 7, [1] * 12])
  np.testing.assert_allclose(_reference(q, k, v, seg), numpy_attention(q, k, v, seg), rtol=1e-5, atol=1e-6)
  check_against_reference(lambda q, k, v: dot_product_attention(q, k, v, seg, "xla"),
                          lambda q, k, v: _reference(q, k, v, seg), (q, k, v))
  out = attend(q, k, v, seg, plan=single_device_plan(), implementation="xla")
  np.testing.assert_allclose(out, numpy_attention(q, k, v, seg), rtol=1e-5, atol=1e-5)
