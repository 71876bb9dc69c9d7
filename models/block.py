"""The Llama pre-norm decoder block, as the layer stack calls it: (carry, layer inputs) -> (carry, outputs)."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from configs import ModelConfig
from models.attention import Attention, layer_kinds
from models.layers import MLP, RMSNorm, decode_split, rms_factor
from models.moe import MoE
from parallel.plan import ShardingPlan

# The residual stream: split on length over `tensor` under Megatron sequence parallelism.
RESIDUAL_AXES = ("batch", "residual_length", "embed")


class Block(nnx.Module):
  """x + attn(norm(x)), then + mlp(norm(.)).

  The carry is the activation that flows from layer to layer: {"x": [B, L, D] residual stream,
  "positions": int [B, L], "segment_ids": int [B, L] or None}. Positions and segment ids ride
  along unchanged, so a pipeline stage that receives a carry has all it needs.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, sparse: bool = False, fused: bool = False):
    """`sparse`: the MLP is a mixture of experts (`models.moe.MoE`) instead of a dense SwiGLU.
    `fused`: q/k/v and gate/up as one weight each, the RMSNorm scales before them folded in
    (`models.fused`): those norms have no parameters, and the products scale their rows instead."""
    kinds = set(layer_kinds(cfg))
    self.linear = None if len(kinds) > 1 else kinds == {"L"}  # None: each layer's kind comes as its input
    self.eps = cfg.norm_eps
    self.attn_norm = None if fused else RMSNorm(cfg, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs, fused=fused)
    self.mlp_norm = None if fused and not sparse else RMSNorm(cfg, rngs=rngs)  # the router reads normed rows
    self.sparse = sparse
    self.mlp = MoE(cfg, rngs=rngs) if sparse else MLP(cfg, rngs=rngs, fused=fused)

  def __call__(self, carry: dict, layer_inputs: Any, plan: ShardingPlan) -> tuple[dict, dict]:
    """Returns the next carry and this layer's outputs for the loss: none for a dense block, the
    router losses, tokens per expert and dropped pairs for an MoE block (`models.moe.MOE_OUTPUTS`).

    `layer_inputs`: None, or in a hybrid stack this layer's kind (1 linear attention, 0 softmax),
    or for a decoder this layer's KV-cache slice {"k", "v"} (`models.cache`), or its index {"layer"}
    into the whole cache the carry holds as "cache_stack" (`Transformer.forward_layers_cached`):
    then the carry also holds "cache_lengths" [B], and the outputs are the new tokens' {"k", "v"};
    with "cache_write_positions" [B] in the carry as well, a decode step's kernel writes them into
    "cache_stack" itself and the outputs are empty.
    """
    x = carry["x"]
    if isinstance(layer_inputs, dict):
      cache = layer_inputs if "layer" not in layer_inputs else {**carry["cache_stack"], **layer_inputs}
      if "layer" in layer_inputs and "cache_write_positions" in carry:
        cache["write_positions"] = carry["cache_write_positions"]
      attn, new_kv = self.attn.with_cache(*self._normed(self.attn_norm, x, carry["positions"], cache,
                                                        carry["cache_lengths"], plan))
      h = plan.constrain(x + attn.astype(x.dtype), RESIDUAL_AXES)
      split_k = decode_split(self.attn.cfg, x.shape[1], plan)
      y = self.mlp(*self._normed(self.mlp_norm, h, plan, split_k))  # dense only (engine)
      out = h + y.astype(h.dtype)
      carry = {**carry, "x": plan.constrain(out, RESIDUAL_AXES)}
      if "cache" in new_kv:  # written in place by the decode kernel: the next layer reads the new cache
        return {**carry, "cache_stack": {**carry["cache_stack"], **new_kv["cache"]}}, {}
      return carry, new_kv
    linear = self.linear if self.linear is not None else layer_inputs == 1
    h = x + self.attn(*self._normed(self.attn_norm, x, carry["positions"], carry["segment_ids"], plan,
                                    linear)).astype(x.dtype)
    h = plan.constrain(h, RESIDUAL_AXES)
    outputs = {}
    if self.sparse:
      y, outputs = self.mlp(self.mlp_norm(h), plan)
    else:
      y = self.mlp(*self._normed(self.mlp_norm, h, plan, 1))
    out = h + y.astype(h.dtype)
    return {**carry, "x": plan.constrain(out, RESIDUAL_AXES)}, outputs

  def _normed(self, norm: RMSNorm | None, x: jax.Array, *args) -> tuple:
    """The arguments of the product that follows a norm: (norm(x), *args), or in the fused layout
    (no norm: its scale is in the weights) (x, *args, rms factor of x)."""
    if norm is not None:
      return (norm(x), *args)
    return (x, *args, rms_factor(x, self.eps))
