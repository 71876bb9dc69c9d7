"""Vocabulary-parallel embedding and cross-entropy against dense references (numpy and the dense
op), forward and gradients, plus the input checks of the public ops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from parallel.mesh import make_mesh
from parallel.vocab.dense import cross_entropy
from parallel.vocab.vocab_parallel import vocab_parallel_cross_entropy, vocab_parallel_embed
from tests.reference import check_against_reference, rel_err

B, L, V, D = 4, 8, 64, 16


def _mesh(data, tensor):
  return make_mesh({"data": data, "tensor": tensor})


def _numpy_cross_entropy(logits, targets):
  """-log softmax(logits)[target] in float64, with the max subtracted (stable)."""
  x = np.asarray(logits, np.float64)
  log_softmax = x - x.max(-1, keepdims=True)
  log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
  return -np.take_along_axis(log_softmax, np.asarray(targets)[..., None], -1)[..., 0], np.exp(log_softmax)


def test_dense_cross_entropy_is_log_softmax():
  """The dense reference against the textbook formula in numpy: values, and softmax - onehot."""
  k1, k2 = jax.random.split(jax.random.key(1))
  logits = 3.0 * jax.random.normal(k1, (B, L, V))
  targets = jax.random.randint(k2, (B, L), 0, V)
  want, softmax = _numpy_cross_entropy(logits, targets)
  np.testing.assert_allclose(cross_entropy(logits, targets), want, rtol=1e-5)
  grad = jax.grad(lambda lg: cross_entropy(lg, targets).sum())(logits)
  np.testing.assert_allclose(grad, softmax - np.eye(V)[np.asarray(targets)], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("data,tensor", [(2, 4), (1, 8)])
def test_cross_entropy_matches_dense(data, tensor):
  mesh = _mesh(data, tensor)
  k1, k2 = jax.random.split(jax.random.key(0))
  logits = 3.0 * jax.random.normal(k1, (B, L, V))
  targets = jax.random.randint(k2, (B, L), 0, V)
  par = lambda lg: vocab_parallel_cross_entropy(lg, targets, mesh=mesh, batch_axes=("data",))
  check_against_reference(par, lambda lg: cross_entropy(lg, targets), (logits,))


def test_cross_entropy_bfloat16():
  mesh = _mesh(2, 4)
  logits = jax.random.normal(jax.random.key(1), (B, L, V)).astype(jnp.bfloat16)
  targets = jax.random.randint(jax.random.key(2), (B, L), 0, V)
  par = lambda lg: vocab_parallel_cross_entropy(lg, targets, mesh=mesh, batch_axes=("data",))
  check_against_reference(par, lambda lg: cross_entropy(lg, targets), (logits,), dtype=jnp.bfloat16)


def test_cross_entropy_with_huge_logits_stays_finite():
  """Logits of 1e4 overflow exp() in float32 unless the max is subtracted first."""
  mesh = _mesh(2, 4)
  k1, k2 = jax.random.split(jax.random.key(7))
  logits = 1e4 + 50.0 * jax.random.normal(k1, (B, L, V))
  targets = jax.random.randint(k2, (B, L), 0, V)
  got = jax.jit(lambda lg: vocab_parallel_cross_entropy(lg, targets, mesh=mesh, batch_axes=("data",)))(logits)
  want, _ = _numpy_cross_entropy(logits, targets)
  assert np.isfinite(np.asarray(got)).all()
  assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("scatter_length", [False, True])
def test_embed_matches_dense(scatter_length):
  mesh = _mesh(2, 4)
  table = jax.random.normal(jax.random.key(3), (V, D))
  ids = jax.random.randint(jax.random.key(4), (B, L), 0, V)
  par = lambda t: vocab_parallel_embed(t, ids, mesh=mesh, batch_axes=("data",), scatter_length=scatter_length)
  check_against_reference(par, lambda t: jnp.take(t, ids, axis=0), (table,))
  if scatter_length:
    assert jax.jit(par)(table).sharding.spec[1] == "tensor"


def test_embed_at_shard_boundaries():
  """Ids on either side of each device's slice edge (V/4 = 16 per device) pick the right rows."""
  mesh = _mesh(2, 4)
  table = np.arange(V * D, dtype=np.float32).reshape(V, D)
  edges = [0, 15, 16, 31, 32, 47, 48, 63]
  ids = np.array([edges, edges[::-1], edges[2:] + edges[:2], edges[1::2] + edges[::2]], np.int32)
  got = jax.jit(lambda t, i: vocab_parallel_embed(t, i, mesh=mesh, batch_axes=("data",)))(table, ids)
  np.testing.assert_array_equal(got, table[ids])
  # Every row's gradient lands on its own row only: the count of its uses, broadcast.
  grad = jax.jit(jax.grad(lambda t: vocab_parallel_embed(t, ids, mesh=mesh, batch_axes=("data",)).sum()))(table)
  counts = np.bincount(ids.ravel(), minlength=V).astype(np.float32)
  np.testing.assert_array_equal(grad, np.broadcast_to(counts[:, None], (V, D)))


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


def test_inputs_are_checked():
  mesh = _mesh(2, 4)
  logits = jnp.zeros((B, L, 62))
  targets = jnp.zeros((B, L), jnp.int32)
  with pytest.raises(ValueError, match=r"vocabulary size 62 is not divisible by mesh axis 'tensor' of size 4"):
    vocab_parallel_cross_entropy(logits, targets, mesh=mesh, batch_axes=("data",))
  with pytest.raises(ValueError, match=r"vocabulary size 62 is not divisible"):
    vocab_parallel_embed(jnp.zeros((62, D)), targets, mesh=mesh, batch_axes=("data",))
  with pytest.raises(ValueError, match=r"targets: 1 id\(s\) outside \[0, 64\), e.g. 64"):
    vocab_parallel_cross_entropy(jnp.zeros((B, L, V)), targets.at[1, 2].set(V), mesh=mesh, batch_axes=("data",))
  with pytest.raises(ValueError, match=r"ids: 1 id\(s\) outside \[0, 64\), e.g. -1"):
    vocab_parallel_embed(jnp.zeros((V, D)), targets.at[0, 0].set(-1), mesh=mesh, batch_axes=("data",))
  with pytest.raises(ValueError, match=r"batch divisible by the batch axes \('data',\)"):
    vocab_parallel_cross_entropy(jnp.zeros((3, L, V)), jnp.zeros((3, L), jnp.int32), mesh=mesh, batch_axes=("data",))


def test_out_of_range_targets_raise_inside_jit_under_checks():
  mesh = _mesh(2, 4)
  targets = jnp.zeros((B, L), jnp.int32).at[3, 7].set(V + 5)
  fn = lambda lg, t: vocab_parallel_cross_entropy(lg, t, mesh=mesh, batch_axes=("data",))
  jax.block_until_ready(jax.jit(fn)(jnp.zeros((B, L, V)), targets))  # off by default: no cost, no check
  jax.config.update("jax_enable_checks", True)  # set before tracing: traces are cached per function
  try:
    checked = lambda lg, t: vocab_parallel_cross_entropy(lg, t, mesh=mesh, batch_axes=("data",))
    err, _ = checkify.checkify(jax.jit(checked))(jnp.zeros((B, L, V)), targets)
  finally:
    jax.config.update("jax_enable_checks", False)
  with pytest.raises(checkify.JaxRuntimeError, match=r"targets: id\(s\) outside \[0, 64\), e.g. 69"):
    err.throw()
