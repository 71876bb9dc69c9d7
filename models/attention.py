"""Grouped-query self-attention with RoPE; the attention op itself comes from the plan's dispatch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from configs import ModelConfig
from models.layers import apply_rope, param, rope_inv_freq
from parallel.attention.dispatch import attend
from parallel.plan import ShardingPlan


def resolve_implementation(cfg: ModelConfig) -> str:
  """"auto" picks cuDNN flash attention where it exists (NVIDIA GPUs, bf16), else XLA."""
  if cfg.attention_impl != "auto":
    return cfg.attention_impl
  on_gpu = jax.default_backend() == "gpu"
  return "cudnn" if on_gpu and cfg.compute_dtype == "bfloat16" else "xla"


class Attention(nnx.Module):
  """Megatron layout: q/k/v column-parallel over heads, the output projection row-parallel."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h, k, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
    self.cfg = cfg
    self.dtype = jnp.dtype(cfg.compute_dtype)
    self.implementation = resolve_implementation(cfg)
    self.wq = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), cfg)
    self.wk = param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), cfg)
    self.wv = param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), cfg)
    self.wo = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), cfg)

  def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array, segment_ids_BxL: jax.Array | None,
               plan: ShardingPlan) -> jax.Array:
    x = x_BxLxD.astype(self.dtype)
    w = lambda p: p[...].astype(self.dtype)
    project = lambda p, axes: plan.constrain(jnp.einsum("bld,dhk->blhk", x, w(p)), ("batch", "length") + axes)
    q = project(self.wq, ("heads", "head_dim"))
    k = project(self.wk, ("kv_heads", "head_dim"))
    v = project(self.wv, ("kv_heads", "head_dim"))
    inv_freq = rope_inv_freq(self.cfg)
    q, k = apply_rope(q, positions_BxL, inv_freq), apply_rope(k, positions_BxL, inv_freq)
    out_BxLxHxD = attend(q, k, v, segment_ids_BxL, plan=plan, implementation=self.implementation)
    out_BxLxHxD = plan.constrain(out_BxLxHxD, ("batch", "length", "heads", "head_dim"))
    return jnp.einsum("blhk,hkd->bld", out_BxLxHxD, w(self.wo))
