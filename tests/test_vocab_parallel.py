"""Vocabulary-parallel embedding and cross-entropy against dense references, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallel.mesh import make_mesh
from parallel.vocab_parallel import cross_entropy, vocab_parallel_cross_entropy, vocab_parallel_embed

B, L, V, D = 4, 8, 64, 16


def _mesh(data, tensor):
  return make_mesh({"data": data, "tensor": tensor})


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_dense_cross_entropy_is_log_softmax():
  """The dense reference against the textbook formula in numpy: values, and softmax - onehot."""
  k1, k2 = jax.random.split(jax.random.key(1))
  logits = 3.0 * jax.random.normal(k1, (B, L, V))
  targets = jax.random.randint(k2, (B, L), 0, V)
  x = np.asarray(logits, np.float64)
  log_softmax = x - x.max(-1, keepdims=True)
  log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
  onehot = np.eye(V)[np.asarray(targets)]
  np.testing.assert_allclose(cross_entropy(logits, targets), -(log_softmax * onehot).sum(-1), rtol=1e-5)
  grad = jax.grad(lambda lg: cross_entropy(lg, targets).sum())(logits)
  np.testing.assert_allclose(grad, np.exp(log_softmax) - onehot, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("data,tensor", [(2, 4), (1, 8)])
def test_cross_entropy_matches_dense(data, tensor):
  mesh = _mesh(data, tensor)
  k1, k2 = jax.random.split(jax.random.key(0))
  logits = 3.0 * jax.random.normal(k1, (B, L, V))
  targets = jax.random.randint(k2, (B, L), 0, V)
  weights = jax.random.uniform(k2, (B, L))

  def loss(fn, lg):
    return jnp.sum(fn(lg, targets) * weights)

  par = lambda lg, t: vocab_parallel_cross_entropy(lg, t, mesh=mesh, batch_axes=("data",))
  ref_val, ref_grad = jax.value_and_grad(lambda lg: loss(cross_entropy, lg))(logits)
  val, grad = jax.jit(jax.value_and_grad(lambda lg: loss(par, lg)))(logits)
  assert _rel(val, ref_val) <= 1e-5
  assert _rel(grad, ref_grad) <= 1e-5
  np.testing.assert_allclose(par(logits, targets), cross_entropy(logits, targets), rtol=1e-5, atol=1e-6)


def test_cross_entropy_bfloat16():
  mesh = _mesh(2, 4)
  logits = jax.random.normal(jax.random.key(1), (B, L, V)).astype(jnp.bfloat16)
  targets = jax.random.randint(jax.random.key(2), (B, L), 0, V)
  out = vocab_parallel_cross_entropy(logits, targets, mesh=mesh, batch_axes=("data",))
  assert _rel(out, cross_entropy(logits.astype(jnp.float32), targets)) <= 2e-2


@pytest.mark.parametrize("scatter_length", [False, True])
def test_embed_matches_dense(scatter_length):
  mesh = _mesh(2, 4)
  table = jax.random.normal(jax.random.key(3), (V, D))
  ids = jax.random.randint(jax.random.key(4), (B, L), 0, V)
  cot = jax.random.normal(jax.random.key(5), (B, L, D))

  def run(fn, t):
    return jnp.sum(fn(t, ids) * cot)

  par = lambda t, i: vocab_parallel_embed(t, i, mesh=mesh, batch_axes=("data",), scatter_length=scatter_length)
  dense = lambda t, i: jnp.take(t, i, axis=0)
  out = jax.jit(par)(table, ids)
  np.testing.assert_allclose(out, dense(table, ids), rtol=1e-6)
  if scatter_length:
    assert out.sharding.spec[1] == "tensor"
  g_ref = jax.grad(lambda t: run(dense, t))(table)
  g = jax.jit(jax.grad(lambda t: run(par, t)))(table)
  assert _rel(g, g_ref) <= 1e-5


def test_full_vocab_logits_never_gathered():
  """The compiled loss holds no [B, L, V]-sized buffer per device: only V/tensor columns."""
  mesh = _mesh(2, 4)
  logits = jax.random.normal(jax.random.key(6), (B, L, V))
  targets = jnp.zeros((B, L), jnp.int32)
  sharded = jax.device_put(logits, jax.NamedSharding(mesh, jax.P("data", None, "tensor")))
  fn = jax.jit(lambda lg: vocab_parallel_cross_entropy(lg, targets, mesh=mesh, batch_axes=("data",)).sum())
  hlo = fn.lower(sharded).compile().as_text()
  assert "all-gather" not in hlo
  assert f"f32[{B // 2},{L},{V}]" not in hlo
