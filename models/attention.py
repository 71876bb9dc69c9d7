"""Grouped-query self-attention with RoPE and a pluggable attention core."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from configs import ModelConfig
from models.layers import apply_rope, constrain, param
from parallel.rules import ShardingPlan


def resolve_implementation(cfg: ModelConfig) -> str:
  """"auto" picks cuDNN flash attention where it exists (NVIDIA GPUs, bf16), else XLA."""
  if cfg.attention_impl != "auto":
    return cfg.attention_impl
  on_gpu = jax.default_backend() == "gpu"
  return "cudnn" if on_gpu and cfg.compute_dtype == "bfloat16" else "xla"


def attention_core(q_BxLxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array,
                   segment_ids_BxL: jax.Array | None, implementation: str) -> jax.Array:
  """Causal attention; with segment ids, tokens attend only within their own document.

  GQA/MQA: H query heads share K key/value heads (H % K == 0). `implementation` is "xla" (any
  backend) or "cudnn" (flash attention on NVIDIA GPUs). Returns [B, L, H, D].
  """
  mask = None
  if segment_ids_BxL is not None:
    mask = segment_ids_BxL[:, None, :, None] == segment_ids_BxL[:, None, None, :]
  return jax.nn.dot_product_attention(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, mask=mask, is_causal=True,
                                      implementation=implementation)


class Attention(nnx.Module):
  """Megatron layout: q/k/v column-parallel over heads, the output projection row-parallel."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h, k, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
    self.dtype = jnp.dtype(cfg.compute_dtype)
    self.implementation = resolve_implementation(cfg)
    self.wq = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), cfg)
    self.wk = param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), cfg)
    self.wv = param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), cfg)
    self.wo = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), cfg)

  def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array, segment_ids_BxL: jax.Array | None,
               inv_freq: jax.Array, plan: ShardingPlan | None) -> jax.Array:
    x = x_BxLxD.astype(self.dtype)
    w = lambda p: p[...].astype(self.dtype)
    q = constrain(jnp.einsum("bld,dhk->blhk", x, w(self.wq)), ("batch", "length", "heads", "head_dim"), plan)
    k = constrain(jnp.einsum("bld,dhk->blhk", x, w(self.wk)), ("batch", "length", "kv_heads", "head_dim"), plan)
    v = constrain(jnp.einsum("bld,dhk->blhk", x, w(self.wv)), ("batch", "length", "kv_heads", "head_dim"), plan)
    q, k = apply_rope(q, positions_BxL, inv_freq), apply_rope(k, positions_BxL, inv_freq)
    out_BxLxHxD = attention_core(q, k, v, segment_ids_BxL, self.implementation)
    out_BxLxHxD = constrain(out_BxLxHxD, ("batch", "length", "heads", "head_dim"), plan)
    return jnp.einsum("blhk,hkd->bld", out_BxLxHxD, w(self.wo))
