"""The decoder against plain references: packing isolation, remat, dtypes, tied head, the three
pieces composing to the whole, and sharded loss and gradients against the dense model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import ModelConfig
from models.transformer import Transformer
from parallel.mesh import make_mesh
from parallel.plan import make_plan, single_device_plan
from parallel.vocab.dispatch import token_cross_entropy
from tests.reference import assert_close, rel_err

CFG = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, d_ff=128, max_seq_len=64)


def _model(cfg=CFG, seed=0):
  return Transformer(cfg, rngs=nnx.Rngs(seed))


def test_packed_documents_do_not_attend_across():
  """Logits of each document in a packed row equal those of the document run alone (one batch:
  row 0 packs a and b, rows 1 and 2 hold each alone followed by padding in a segment of its own,
  row 3 packs them without segment ids)."""
  model = _model()
  rng = np.random.default_rng(0)
  a, b = rng.integers(0, 128, 11), rng.integers(0, 128, 21)
  pad = lambda doc: np.concatenate([doc, np.zeros(32 - len(doc), int)])
  tokens = np.stack([np.concatenate([a, b]), pad(a), pad(b), np.concatenate([a, b])])
  packed_seg = [1] * 11 + [2] * 21
  alone_seg = lambda n: [1] * n + [2] * (32 - n)
  seg = np.array([packed_seg, alone_seg(11), alone_seg(21), [1] * 32])
  packed_pos = list(range(11)) + list(range(21))
  pos = np.array([packed_pos, range(32), range(32), packed_pos])
  graphdef, state = nnx.split(model)
  out = jax.jit(lambda *x: nnx.merge(graphdef, state)(*x))(*map(jnp.asarray, (tokens, pos, seg)))
  np.testing.assert_allclose(out[0, :11], out[1, :11], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[0, 11:], out[2, :21], rtol=1e-5, atol=1e-5)
  # Without separate segments the second document does see the first.
  assert rel_err(out[3, 11:], out[2, :21]) > 1e-3


def _loss_and_grads(cfg, plan=None, batch=8, length=16):
  plan = plan or single_device_plan()
  model = _model(cfg)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  tokens = jax.random.randint(jax.random.key(1), (batch, length + 1), 0, cfg.vocab_size)

  def loss(p):
    logits = nnx.merge(graphdef, p)(tokens[:, :-1], plan=plan)
    return jnp.mean(token_cross_entropy(logits, tokens[:, 1:], plan))

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def dense():
  """Loss and gradients of the plain model on one device."""
  return _loss_and_grads(CFG)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_policies_change_nothing(remat, dense):
  l0, g0 = dense
  l1, g1 = _loss_and_grads(dataclasses.replace(CFG, remat=remat))
  assert rel_err(l1, l0) <= 1e-6
  assert_close(g1, g0, what="gradients")


def test_bfloat16_compute_close_to_float32():
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 128)
  run = lambda m: jax.jit(lambda g, s: nnx.merge(g, s)(tokens))(*nnx.split(m))
  f32 = run(_model())
  bf16 = run(_model(dataclasses.replace(CFG, compute_dtype="bfloat16")))
  assert bf16.dtype == jnp.bfloat16  # the loss upcasts; see Transformer.logits
  assert rel_err(bf16.astype(jnp.float32), f32) <= 2e-2


def test_tied_embeddings_have_no_head():
  model = _model(dataclasses.replace(CFG, tie_embeddings=True))
  assert model.lm_head is None
  tokens = jnp.arange(8)[None]
  plan = single_device_plan()
  carry, _ = model.forward_layers(model.embed_tokens(tokens, plan=plan), plan=plan)
  h = model.final_norm(carry["x"])
  np.testing.assert_allclose(model(tokens), h @ model.embed[...].T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mesh,zero,sp", [
    ({"data": 2, "tensor": 4}, 0, True),
    ({"fsdp": 4, "tensor": 2}, 3, False),
    ({"data": 2, "fsdp": 2, "tensor": 2}, 2, True),
])
def test_sharded_model_loss_and_grads_match_dense(mesh, zero, sp, dense):
  plan = make_plan(make_mesh({**mesh}), zero_stage=zero, sequence_parallel=sp)
  l_ref, g_ref = dense
  l, g = _loss_and_grads(CFG, plan)
  assert rel_err(l, l_ref) <= 1e-5
  assert_close(g, g_ref, what="gradients")


def test_auto_attention_is_xla_off_gpu():
  from models.attention import resolve_implementation
  assert resolve_implementation(dataclasses.replace(CFG, compute_dtype="bfloat16")) == "xla"  # CPU here
  assert resolve_implementation(dataclasses.replace(CFG, attention_impl="cudnn")) == "cudnn"


def test_linear_attention_layer_is_the_recurrence():
  """The attention module in linear mode: its projections and RoPE, the token-by-token decayed
  recurrence, each head RMS-normalised, the output projection."""
  from models.attention import Attention
  from models.layers import apply_rope, rope_inv_freq
  from parallel.linear.linear_attention import decay_rates
  from tests.parallel.linear_reference import recurrent_linear_attention
  cfg = dataclasses.replace(CFG, layer_pattern="L", linear_chunk=4)
  attn = Attention(cfg, rngs=nnx.Rngs(3))
  x = jax.random.normal(jax.random.key(4), (2, 12, cfg.d_model))
  pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
  seg = jnp.asarray([[1] * 5 + [2] * 7, [1] * 12])
  got = attn(x, pos, seg, single_device_plan(), linear=True)
  proj = lambda w: jnp.einsum("bld,dhk->blhk", x, w[...])
  inv = rope_inv_freq(cfg)
  q, k = apply_rope(proj(attn.wq), pos, inv), apply_rope(proj(attn.wk), pos, inv)
  o = recurrent_linear_attention(q, k, proj(attn.wv), seg, decay_rates(cfg.n_kv_heads))
  o = o / jnp.sqrt(jnp.mean(o * o, axis=-1, keepdims=True) + cfg.norm_eps)
  assert rel_err(got, jnp.einsum("blhk,hkd->bld", o, attn.wo[...])) <= 1e-5


def test_hybrid_stack_runs_each_layer_as_its_pattern_says():
  """"LS": layer 0 linear, layer 1 softmax, by hand through the layer function; the same weights
  as "SS" or "LL" give other logits."""
  tokens = jax.random.randint(jax.random.key(5), (2, 16), 0, CFG.vocab_size)
  plan = single_device_plan()
  hybrid = _model(dataclasses.replace(CFG, layer_pattern="LS", linear_chunk=4))
  fn, stacked = hybrid.layer_fn(plan)
  carry = hybrid.embed_tokens(tokens, plan=plan)
  for i, kind in enumerate((1, 0)):
    carry, _ = fn(jax.tree.map(lambda p: p[i], stacked), carry, jnp.int32(kind))
  want = hybrid(tokens)
  np.testing.assert_allclose(hybrid.head(carry["x"], plan=plan), want, rtol=1e-5, atol=1e-5)
  _, state = nnx.split(hybrid)
  for pattern in ("SS", "LL"):
    graphdef, _ = nnx.split(_model(dataclasses.replace(CFG, layer_pattern=pattern, linear_chunk=4)))
    assert rel_err(nnx.merge(graphdef, state)(tokens), want) > 1e-3
