"""The Llama-family decoder: embedding, scanned pre-norm blocks, final norm, output head.

Layers are created stacked (every block parameter has a leading `layers` axis) and run with
`jax.lax.scan`, so compile time does not grow with depth and a pipeline can later split the stack
into stages. The model takes an optional `ShardingPlan`; without one it is a plain dense model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from configs import ModelConfig
from models.attention import Attention
from models.layers import MLP, RMSNorm, constrain, param, rope_inv_freq
from parallel.rules import ShardingPlan
from parallel.vocab_parallel import vocab_parallel_embed

def _save_dots_and_attention(prim, *args, **params) -> bool:
  """Keeps matmul outputs and the flash-attention kernel's outputs (and softmax statistics), so
  the backward pass recomputes only cheap elementwise work, not the attention forward."""
  if prim.name.startswith("dot_product_attention_fwd"):
    return True
  return jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params)


_REMAT_POLICIES = {
    "full": None,  # save nothing but each block's input
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_and_attention": _save_dots_and_attention,
}
RESIDUAL = ("batch", "residual_length", "embed")


def _compute_layout(layer_state: nnx.State, plan: ShardingPlan | None) -> nnx.State:
  """One layer's weights (a slice of the stack) pinned to the `params` table's layout."""
  if plan is None:
    return layer_state
  pin = lambda v: v.replace(plan.constrain_weight(v[...], v.get_metadata()["logical_axes"][1:]))
  return jax.tree.map(pin, layer_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


class Block(nnx.Module):
  """Pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(.))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, inv_freq, plan):
    h = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), positions_BxL, segment_ids_BxL, inv_freq, plan).astype(x_BxLxD.dtype)
    h = constrain(h, RESIDUAL, plan)
    out = h + self.mlp(self.mlp_norm(h), plan).astype(h.dtype)
    return constrain(out, RESIDUAL, plan)


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
  @nnx.split_rngs(splits=cfg.n_layers)
  @nnx.vmap(in_axes=0, out_axes=0)
  def create(rngs: nnx.Rngs) -> Block:
    return Block(cfg, rngs=rngs)

  blocks = create(rngs)
  for _, var in nnx.iter_graph(blocks):
    if isinstance(var, nnx.Param):
      var.set_metadata(logical_axes=("layers",) + tuple(var.get_metadata()["logical_axes"]))
  return blocks


class Transformer(nnx.Module):
  """tokens [B, L] (+ positions, segment ids) -> logits [B, L, V] in the compute dtype."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg)
    self.layers = _stacked_blocks(cfg, rngs)
    self.final_norm = RMSNorm(cfg, rngs=rngs)
    self.lm_head = None if cfg.tie_embeddings else param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg)

  def __call__(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
               segment_ids_BxL: jax.Array | None = None, *, plan: ShardingPlan | None = None) -> jax.Array:
    return self.logits(self.hidden(tokens_BxL, positions_BxL, segment_ids_BxL, plan=plan), plan=plan)

  def hidden(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, *, plan=None) -> jax.Array:
    """Final-norm hidden states [B, L, D] in the compute dtype."""
    cfg = self.cfg
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
    x = self._embed(tokens_BxL, plan).astype(cfg.compute_dtype)
    x = constrain(x, RESIDUAL, plan)
    inv_freq = rope_inv_freq(cfg)
    graphdef, stacked = nnx.split(self.layers)

    def block_fn(x, layer_state):
      block = nnx.merge(graphdef, layer_state)
      return block(x, positions_BxL, segment_ids_BxL, inv_freq, plan)

    if cfg.remat != "none":
      # Inside a rolled scan XLA cannot merge the recomputation with the forward pass, so CSE
      # needs no barrier; unrolled layers sit side by side, and without one remat would vanish.
      block_fn = jax.checkpoint(block_fn, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=cfg.scan_unroll > 1)

    def body(x, layer_state):
      # Outside remat, so a gather this implies (ZeRO-1/2 masters live sharded) is done once per
      # step, layer by layer, and its result is kept for the backward pass.
      return block_fn(x, _compute_layout(layer_state, plan)), None

    x, _ = jax.lax.scan(body, x, stacked, unroll=cfg.scan_unroll)
    return self.final_norm(x)

  def logits(self, h_BxLxD: jax.Array, *, plan: ShardingPlan | None = None) -> jax.Array:
    """Logits in the compute dtype; the loss upcasts to float32. (float32 logits would make the
    two backward matmuls of the output layer float32 too: about 2x slower on tensor cores.)"""
    dt = jnp.dtype(self.cfg.compute_dtype)
    h = h_BxLxD.astype(dt)
    if self.lm_head is None:
      out = jnp.einsum("bld,vd->blv", h, self.embed[...].astype(dt))
    else:
      out = jnp.einsum("bld,dv->blv", h, self.lm_head[...].astype(dt))
    return constrain(out, ("batch", "length", "vocab"), plan)

  def _embed(self, tokens_BxL: jax.Array, plan: ShardingPlan | None) -> jax.Array:
    vocab_axes = plan.mesh_axes("vocab") if plan is not None else ()
    if not vocab_axes:
      return jnp.take(self.embed[...], tokens_BxL, axis=0)
    (axis,) = vocab_axes
    return vocab_parallel_embed(self.embed[...], tokens_BxL, mesh=plan.mesh, axis=axis,
                                batch_axes=plan.mesh_axes("batch"),
                                scatter_length=plan.mesh_axes("residual_length") == (axis,))


def logical_axes(state: nnx.State):
  """The `logical_axes` metadata of every parameter, as a pure dict shaped like `state.to_pure_dict()`."""
  return nnx.to_pure_dict(jax.tree.map(lambda v: tuple(v.get_metadata()["logical_axes"]), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable)))


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int) -> float:
  """Training FLOPs per token: 6 x (parameters but the input embedding) + 6 x layers x d_model x seq."""
  non_embedding = n_params - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
  return 6.0 * non_embedding + 6.0 * cfg.n_layers * cfg.d_model * seq_len
