"""The Llama-family decoder in three separately callable pieces: embedding, layer stack, head.

Layers are created stacked (every block parameter has a leading `layers` axis) and run through
the layer-stack seam (`models.stack`), so compile time does not grow with depth and a pipeline can
split the stack into stages. A pipeline puts `embed_tokens` on its first stage and `head` (with
the loss) on its last; a decoder runs the three pieces one token at a time.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from configs import ModelConfig
from models.attention import layer_kinds, reads_cache_in_place
from models.block import RESIDUAL_AXES, Block
from models.layers import RMSNorm, decode_split, param, rms_factor, rms_norm, scaled_product
from models.moe import RouterBias, expert_width, is_sparse, stack_layout
from models.stack import Carry, make_layer_fn, scan_layers
from parallel.plan import ShardingPlan, single_device_plan
from parallel.vocab.dispatch import embed_lookup


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs, n: int, sparse: bool = False, fused: bool = False) -> Block:
  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=0, out_axes=0)
  def create(rngs: nnx.Rngs) -> Block:
    return Block(cfg, rngs=rngs, sparse=sparse, fused=fused)

  blocks = create(rngs)
  for _, var in nnx.iter_graph(blocks):
    if isinstance(var, (nnx.Param, RouterBias)):
      var.set_metadata(logical_axes=("layers",) + tuple(var.get_metadata()["logical_axes"]))
  return blocks


def logical_axes(state: nnx.State) -> Any:
  """The `logical_axes` metadata of every parameter, as a pure dict shaped like `state.to_pure_dict()`."""
  return nnx.to_pure_dict(jax.tree.map(lambda v: tuple(v.get_metadata()["logical_axes"]), state,
                                       is_leaf=lambda x: isinstance(x, nnx.Variable)))


def abstract_params(cfg: ModelConfig, plan: ShardingPlan, *, fused_projections: bool = False) -> Any:
  """The parameters of `Transformer(cfg, fused_projections=...)` as a pure dict of shapes and dtypes,
  each with its sharding by the plan's `params` table (nothing is allocated)."""
  _, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), fused_projections=fused_projections)))
  abstract = nnx.to_pure_dict(state)
  shardings = plan.tree_shardings(logical_axes(state), abstract, plan.params)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


class Transformer(nnx.Module):
  """tokens [B, L] (+ positions, segment ids) -> logits [B, L, V] in the compute dtype.

  With mixture-of-experts layers (model.n_experts > 0) the blocks sit in two stacks: `layers`, the
  dense-MLP blocks in order (absent when every layer is sparse), and `moe_layers`, the MoE blocks
  in order; `models.moe.layer_slots` maps each layer to its slot and `models.moe.stack_layout`
  says how the stacks interleave.

  `fused_projections`: each block's q/k/v and (dense) gate/up weights as one weight each
  (`models.fused`, the layout the decoder serves from); training and checkpoints use separate ones.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, fused_projections: bool = False):
    self.cfg = cfg
    self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg)
    n_sparse = sum(is_sparse(cfg, i) for i in range(cfg.n_layers))
    if cfg.n_layers > n_sparse:
      self.layers = _stacked_blocks(cfg, rngs, cfg.n_layers - n_sparse, fused=fused_projections)
    if n_sparse:
      self.moe_layers = _stacked_blocks(cfg, rngs, n_sparse, sparse=True, fused=fused_projections)
    # The fused layout folds the final norm's scale into an untied output projection (`models.fused`).
    self.final_norm = None if fused_projections and not cfg.tie_embeddings else RMSNorm(cfg, rngs=rngs)
    self.lm_head = None if cfg.tie_embeddings else param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg)

  def __call__(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
               segment_ids_BxL: jax.Array | None = None, *, plan: ShardingPlan | None = None) -> jax.Array:
    """All three pieces; without a plan, the model runs as a plain dense model on one device."""
    plan = plan or single_device_plan()
    carry = self.embed_tokens(tokens_BxL, positions_BxL, segment_ids_BxL, plan=plan)
    carry, _ = self.forward_layers(carry, plan=plan)
    return self.head(carry["x"], plan=plan)

  def embed_tokens(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
                   segment_ids_BxL: jax.Array | None = None, *, plan: ShardingPlan) -> Carry:
    """The first piece: the carry the layers start from (see `models.block.Block`).

    Positions default to 0..L-1 and segment ids to None (plain causal attention).
    """
    return embed_activations(self.cfg, self.embed[...], tokens_BxL, positions_BxL, segment_ids_BxL, plan)

  def layer_fn(self, plan: ShardingPlan, stack: str = "layers"):
    """(the pure layer function, the stacked layer parameters as a pure dict) of `stack`:
    "layers" (the dense-MLP blocks) or "moe_layers" (the MoE blocks)."""
    cfg = self.cfg
    graphdef, stacked = nnx.split(getattr(self, stack))
    per_layer_axes = jax.tree.map(lambda axes: axes[1:], logical_axes(stacked), is_leaf=lambda x: isinstance(x, tuple))
    # Unrolled layers sit side by side, and without a barrier XLA would merge the recomputation
    # with the forward pass.
    fn = make_layer_fn(graphdef, per_layer_axes, plan=plan, remat=cfg.remat, prevent_cse=cfg.scan_unroll > 1)
    return fn, nnx.to_pure_dict(stacked)

  def layer_inputs(self, stack: str | None = None) -> jax.Array | None:
    """Each layer's own input to the layer function: its attention kind in a hybrid stack (of the
    layers of `stack` only, when given)."""
    kinds = layer_kinds(self.cfg)
    if len(set(kinds)) == 1:
      return None
    if stack is not None:
      kinds = [k for i, k in enumerate(kinds) if is_sparse(self.cfg, i) == (stack == "moe_layers")]
    return jnp.asarray([k == "L" for k in kinds], jnp.int32)

  def forward_layers(self, carry: Carry, *, plan: ShardingPlan, run_layers=scan_layers) -> tuple[Carry, dict]:
    """The second piece: every layer in order, by `run_layers` (the scan, or a replacement with
    the same signature). Returns the last carry and the per-layer outputs (with MoE layers: those
    of the MoE blocks, stacked in layer order)."""
    if self.cfg.n_experts == 0:
      fn, stacked = self.layer_fn(plan)
      return run_layers(fn, stacked, carry, self.layer_inputs(), unroll=self.cfg.scan_unroll)
    return self._forward_mixed(carry, plan, run_layers)

  def _forward_mixed(self, carry: Carry, plan: ShardingPlan, run_layers) -> tuple[Carry, dict]:
    """Dense prefix, then groups of (every - 1 dense blocks, one MoE block), then a dense suffix
    (`models.moe.StackLayout`): three scans at most, whatever the depth."""
    layout, unroll = stack_layout(self.cfg), self.cfg.scan_unroll
    moe_fn, moe = self.layer_fn(plan, "moe_layers")
    moe_inputs = self.layer_inputs("moe_layers")
    dense_fn, dense, dense_inputs = None, None, None
    if hasattr(self, "layers"):
      dense_fn, dense = self.layer_fn(plan)
      dense_inputs = self.layer_inputs("layers")
    cut = lambda tree, start, stop: jax.tree.map(lambda a: a[start:stop], tree)
    run = lambda c, params, inputs, n: run_layers(dense_fn, params, c, inputs, unroll=max(1, min(unroll, n)))[0]

    a, g, per = layout.prefix, layout.groups, layout.every - 1
    if a:
      carry = run(carry, cut(dense, 0, a), cut(dense_inputs, 0, a), a)
    if per:
      group = lambda tree: jax.tree.map(lambda x: x[a:a + g * per].reshape(g, per, *x.shape[1:]), tree)
      group_dense, group_inputs = group(dense), group(dense_inputs)
    else:
      group_dense = group_inputs = None

    def body(c, xs):
      d_params, d_inputs, m_params, m_inputs = xs
      if per:
        c = run(c, d_params, d_inputs, per)
      return moe_fn(m_params, c, m_inputs)

    carry, outputs = jax.lax.scan(body, carry, (group_dense, group_inputs, moe, moe_inputs),
                                  unroll=max(1, min(unroll // layout.every, g)))
    if layout.suffix:
      n = jax.tree.leaves(dense)[0].shape[0]
      carry = run(carry, cut(dense, n - layout.suffix, n), cut(dense_inputs, n - layout.suffix, n), layout.suffix)
    return carry, outputs

  def forward_layers_cached(self, carry: Carry, cache_rows: dict, *, plan: ShardingPlan,
                            run_layers=scan_layers, unroll: int | None = None) -> tuple[Carry, dict]:
    """The second piece for a decoder: each layer gets its KV-cache slice (`models.cache.KVCache.rows`)
    as its layer input; the carry holds "cache_lengths" [B]. Returns the last carry and the new
    tokens' keys and values, {"k", "v"} [layers, B, T, K, D]. `unroll`: layers per scan
    iteration (default `model.scan_unroll`). With the decode kernel (`reads_cache_in_place`) the
    whole cache rides in the carry ("cache_stack") and each layer gets its index ({"layer"}); a
    decode step given each row's write position (carry "cache_write_positions" [B]) has its kernel
    write the new tokens into that cache and returns {"written": the cache rows, updated} instead."""
    if set(layer_kinds(self.cfg)) != {"S"}:
      raise ValueError(f"layer_pattern={self.cfg.layer_pattern!r}: the KV cache decodes softmax layers only")
    fn, stacked = self.layer_fn(plan)
    unroll = self.cfg.scan_unroll if unroll is None else unroll
    if not reads_cache_in_place(self.cfg, plan):
      return run_layers(fn, stacked, carry, cache_rows, unroll=unroll)
    # The decode kernel reads each layer's keys and values from the stacked cache in place: the
    # cache rides in the carry, unchanged, and each layer gets its index instead of its slice.
    layers = {"layer": jnp.arange(self.cfg.n_layers, dtype=jnp.int32)}
    carry, new_kv = run_layers(fn, stacked, {**carry, "cache_stack": cache_rows}, layers, unroll=unroll)
    if not new_kv:  # a decode step whose kernel wrote the new tokens into the cache it read
      new_kv = {"written": carry["cache_stack"]}
    return {k: v for k, v in carry.items() if k not in ("cache_stack", "cache_write_positions")}, new_kv

  def head(self, x_BxLxD: jax.Array, *, plan: ShardingPlan) -> jax.Array:
    """The last piece: final norm and output projection. Logits in the compute dtype; the loss
    upcasts to float32. (float32 logits would make the two backward matmuls of the output layer
    float32 too: about 2x slower on tensor cores.)"""
    out = self.embed[...] if self.lm_head is None else self.lm_head[...]
    if self.final_norm is None:  # the fused layout: the norm's scale is in lm_head
      cfg, dt = self.cfg, jnp.dtype(self.cfg.compute_dtype)
      y = scaled_product(x_BxLxD.astype(dt), out.astype(dt), decode_split(cfg, x_BxLxD.shape[1], plan),
                         rms_factor(x_BxLxD, cfg.norm_eps), dt)
      return plan.constrain(y, ("batch", "length", "vocab"))
    return head_logits(self.cfg, self.final_norm.scale[...], out, x_BxLxD, plan)


def embed_activations(cfg: ModelConfig, table_VxD: jax.Array, tokens_BxL: jax.Array, positions_BxL: jax.Array | None,
                      segment_ids_BxL: jax.Array | None, plan: ShardingPlan) -> Carry:
  """The embedding piece as a function of its parameter (what a pipeline's first stage runs)."""
  if positions_BxL is None:
    positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
  x = embed_lookup(table_VxD, tokens_BxL, plan).astype(cfg.compute_dtype)
  return {"x": plan.constrain(x, RESIDUAL_AXES), "positions": positions_BxL, "segment_ids": segment_ids_BxL}


def head_logits(cfg: ModelConfig, norm_scale_D: jax.Array, out_weight: jax.Array, x_BxLxD: jax.Array,
                plan: ShardingPlan) -> jax.Array:
  """The head piece as a function of its parameters: final norm, then the output projection by
  `out_weight`, [D, V] (or the embedding table [V, D] when tied)."""
  dt = jnp.dtype(cfg.compute_dtype)
  h = rms_norm(x_BxLxD, norm_scale_D, cfg.norm_eps).astype(dt)
  if cfg.tie_embeddings:
    out = jnp.einsum("bld,vd->blv", h, out_weight.astype(dt))
  else:
    out = jnp.einsum("bld,dv->blv", h, out_weight.astype(dt))
  return plan.constrain(out, ("batch", "length", "vocab"))


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int) -> float:
  """Training FLOPs per token: 6 x (parameters a token uses, but the input embedding), plus
  attention: causal softmax layers 6 x d_model x seq each; linear layers 6 x d_model x (chunk +
  2 x head_dim) each (the causal half of a chunk's quadratic form, and the state's read and update).

  With experts a token uses only its top-k routed experts (plus the shared ones and the router):
  the other n_experts - top_k experts of every MoE layer are left out, so MFU counts active
  parameters."""
  non_embedding = n_params - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
  n_sparse = sum(is_sparse(cfg, i) for i in range(cfg.n_layers))
  idle_experts = n_sparse * (cfg.n_experts - cfg.experts_top_k) * 3 * cfg.d_model * expert_width(cfg)
  kinds = layer_kinds(cfg)
  softmax, linear = kinds.count("S"), kinds.count("L")
  chunk = min(cfg.linear_chunk, seq_len)
  return (6.0 * (non_embedding - idle_experts) + 6.0 * softmax * cfg.d_model * seq_len
          + 6.0 * linear * cfg.d_model * (chunk + 2 * cfg.resolved_head_dim))
