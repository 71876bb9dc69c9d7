"""The decoder's fused layout (`models.fused`) against the model with separate q/k/v and gate/up
weights and its norms: the same logits, and the same gradients with respect to the separate
parameters when the loss runs the fused model on `fuse_projections` of them."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import ModelConfig
from models.fused import fuse_projections
from models.transformer import Transformer
from tests.reference import assert_close

CFG = ModelConfig(vocab_size=96, d_model=32, n_layers=3, n_heads=8, n_kv_heads=2, d_ff=48, max_seq_len=32)
CASES = {
    "llama": CFG,
    "qwen_bias_and_qk_norm": dataclasses.replace(CFG, qkv_bias=True, qk_norm=True),
    # Layer 0 dense, layers 1 and 2 experts: the attention of both stacks and the dense MLP fused.
    "experts": dataclasses.replace(CFG, n_experts=4, experts_top_k=2, moe_first_dense=1, expert_d_ff=16),
}


def _random_params(model: Transformer, seed: int) -> dict:
  """Every parameter random (the zero-initialised biases too), so a misplaced head shows."""
  params = nnx.to_pure_dict(nnx.state(model))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_layout_computes_what_the_separate_weights_do(case):
  cfg = CASES[case]
  separate = Transformer(cfg, rngs=nnx.Rngs(0))
  fused = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), fused_projections=True))
  graph_s, graph_f = nnx.graphdef(separate), nnx.graphdef(fused)
  params = _random_params(separate, 1)
  fused_params = fuse_projections(cfg, params)
  want_shapes = jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(nnx.state(fused)))
  assert jax.tree.map(lambda x: x.shape, fused_params) == want_shapes

  tokens = jax.random.randint(jax.random.key(2), (2, 17), 0, cfg.vocab_size)
  target = jax.random.normal(jax.random.key(3), (2, 17, cfg.vocab_size))

  def value_and_grad(graphdef, layout):  # a loss that weighs every logit differently
    loss = lambda p: jnp.sum(nnx.merge(graphdef, layout(p))(tokens) * target)
    return jax.jit(jax.value_and_grad(loss))(params)

  # Gradients with respect to the separate parameters, through the fusing itself: the norm scales'
  # gradients then check that the folded scales act where the norms did.
  want_loss, want_grads = value_and_grad(graph_s, lambda p: p)
  loss, grads = value_and_grad(graph_f, lambda p: fuse_projections(cfg, p))
  logits = jax.jit(lambda p: nnx.merge(graph_f, p)(tokens))(fused_params)
  assert_close(logits, jax.jit(lambda p: nnx.merge(graph_s, p)(tokens))(params), what="logits")
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  assert_close(grads, want_grads, what="gradients")


def test_fused_weight_holds_each_kv_heads_queries_then_key_then_value():
  """By hand: entry [d, j, i] of wqkv is query head j*G + i for i < G, then kv head j's key and
  value, each row d times the attention norm's scale[d]; w_gate_up [d, 0] and [d, 1] are gate and
  up times the MLP norm's scale[d]; lm_head's row d times the final norm's scale[d]; the norms'
  parameters are gone."""
  params = _random_params(Transformer(CFG, rngs=nnx.Rngs(0)), 4)
  layers = params["layers"]
  fused = fuse_projections(CFG, params)["layers"]
  assert "attn_norm" not in fused and "mlp_norm" not in fused
  wqkv = np.asarray(fused["attn"]["wqkv"])
  s = np.asarray(layers["attn_norm"]["scale"])[:, :, None]  # [L, D, 1]
  g = CFG.n_heads // CFG.n_kv_heads
  for j in range(CFG.n_kv_heads):
    for i in range(g):
      np.testing.assert_allclose(wqkv[:, :, j, i], np.asarray(layers["attn"]["wq"])[:, :, j * g + i] * s, rtol=1e-6)
    np.testing.assert_allclose(wqkv[:, :, j, g], np.asarray(layers["attn"]["wk"])[:, :, j] * s, rtol=1e-6)
    np.testing.assert_allclose(wqkv[:, :, j, g + 1], np.asarray(layers["attn"]["wv"])[:, :, j] * s, rtol=1e-6)
  top = fuse_projections(CFG, params)
  assert "final_norm" not in top
  np.testing.assert_allclose(top["lm_head"], np.asarray(params["lm_head"]) * np.asarray(params["final_norm"]["scale"])[:, None],
                             rtol=1e-6)
  w_gate_up, s = np.asarray(fused["mlp"]["w_gate_up"]), np.asarray(layers["mlp_norm"]["scale"])[:, :, None]
  np.testing.assert_allclose(w_gate_up[:, :, 0], np.asarray(layers["mlp"]["w_gate"]) * s, rtol=1e-6)
  np.testing.assert_allclose(w_gate_up[:, :, 1], np.asarray(layers["mlp"]["w_up"]) * s, rtol=1e-6)
