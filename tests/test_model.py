"""The decoder's pieces against plain references: packing isolation, GQA, remat, dtypes, sharded grads."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import ModelConfig
from models.attention import attention_core
from models.layers import swiglu
from models.transformer import Transformer
from parallel.mesh import make_mesh
from parallel.rules import make_plan
from training.step import token_losses

CFG = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, d_ff=128, max_seq_len=64)


def _model(cfg=CFG, seed=0):
  return Transformer(cfg, rngs=nnx.Rngs(seed))


def _rel(a, b):
  return float(jnp.linalg.norm(jnp.asarray(a, jnp.float32) - b) / jnp.linalg.norm(b))


def test_packed_documents_do_not_attend_across():
  """Logits of each document in a packed row equal those of the document run alone."""
  graphdef, state = nnx.split(_model())
  run = jax.jit(lambda *a: nnx.merge(graphdef, state)(*a))
  rng = np.random.default_rng(0)
  a, b = rng.integers(0, 128, 11), rng.integers(0, 128, 21)
  packed = jnp.asarray(np.concatenate([a, b])[None])
  seg = jnp.asarray([[1] * 11 + [2] * 21])
  pos = jnp.asarray([list(range(11)) + list(range(21))])
  alone = lambda doc: run(jnp.asarray(doc[None]), jnp.arange(len(doc))[None], jnp.ones((1, len(doc)), jnp.int32))
  out = run(packed, pos, seg)
  np.testing.assert_allclose(out[0, :11], alone(a)[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[0, 11:], alone(b)[0], rtol=1e-5, atol=1e-5)
  # Without separate segments the second document does see the first.
  assert _rel(run(packed, pos, jnp.ones_like(seg))[0, 11:], alone(b)[0]) > 1e-3


def _reference_attention(q, k, v, seg):
  """Plain softmax attention with K/V heads repeated for each query group."""
  groups = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  L = q.shape[1]
  mask = jnp.tril(jnp.ones((L, L), bool))[None, None] & (seg[:, None, :, None] == seg[:, None, None, :])
  probs = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2), (8, 1)])
def test_attention_core_gqa_matches_reference(heads, kv_heads):
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (2, 12, heads, 16))
  k = jax.random.normal(ks[1], (2, 12, kv_heads, 16))
  v = jax.random.normal(ks[2], (2, 12, kv_heads, 16))
  seg = jnp.asarray([[1] * 5 + [2] * 7, [1] * 12])
  f = lambda q, k, v: attention_core(q, k, v, seg, "xla")
  ref = lambda q, k, v: _reference_attention(q, k, v, seg)
  assert _rel(jax.jit(f)(q, k, v), jax.jit(ref)(q, k, v)) <= 1e-5
  grad = lambda fn: jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), (0, 1, 2)))(q, k, v)
  g, g_ref = grad(f), grad(ref)
  for x, y in zip(g, g_ref):
    assert _rel(x, y) <= 1e-5


def _loss_and_grads(cfg, plan=None, batch=8, length=16):
  model = _model(cfg)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  tokens = jax.random.randint(jax.random.key(1), (batch, length + 1), 0, cfg.vocab_size)

  def loss(p):
    logits = nnx.merge(graphdef, p)(tokens[:, :-1], plan=plan)
    return jnp.mean(token_losses(logits, tokens[:, 1:], plan))

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_policies_change_nothing(remat):
  l0, g0 = _loss_and_grads(CFG)
  l1, g1 = _loss_and_grads(dataclasses.replace(CFG, remat=remat))
  assert _rel(l1, l0) <= 1e-6
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    assert _rel(a, b) <= 1e-5


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


def test_bfloat16_compute_close_to_float32():
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 128)
  run = lambda m: jax.jit(lambda g, s: nnx.merge(g, s)(tokens))(*nnx.split(m))
  f32 = run(_model())
  bf16 = run(_model(dataclasses.replace(CFG, compute_dtype="bfloat16")))
  assert bf16.dtype == jnp.bfloat16  # the loss upcasts; see Transformer.logits
  assert _rel(bf16.astype(jnp.float32), f32) <= 2e-2


def test_tied_embeddings_have_no_head():
  model = _model(dataclasses.replace(CFG, tie_embeddings=True))
  assert model.lm_head is None
  tokens = jnp.arange(8)[None]
  h = model.hidden(tokens)
  np.testing.assert_allclose(model(tokens), h @ model.embed[...].T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mesh,zero,sp", [
    ({"data": 2, "tensor": 4}, 0, True),
    ({"fsdp": 4, "tensor": 2}, 3, False),
    ({"data": 2, "fsdp": 2, "tensor": 2}, 2, True),
])
def test_sharded_model_loss_and_grads_match_dense(mesh, zero, sp):
  plan = make_plan(make_mesh({**mesh}), zero_stage=zero, sequence_parallel=sp)
  l_ref, g_ref = _loss_and_grads(CFG)
  l, g = _loss_and_grads(CFG, plan)
  assert _rel(l, l_ref) <= 1e-5
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    assert _rel(a, b) <= 1e-5


def test_auto_attention_is_xla_off_gpu():
  from models.attention import resolve_implementation
  assert resolve_implementation(dataclasses.replace(CFG, compute_dtype="bfloat16")) == "xla"  # CPU here
  assert resolve_implementation(dataclasses.replace(CFG, attention_impl="cudnn")) == "cudnn"
