"""The decoder's weight layout: q/k/v as one weight and gate/up as one, from the separate ones.

Training and checkpoints keep separate q, k, v, gate and up weights. A decode step multiplies one
or a few rows by every weight, so its time is the time to stream the weights, and cuBLAS streams a
few large weights faster than many small ones (at `1b` shape on an H200: gate and up as one
2048 x 11264 weight 3.4 TB/s, each alone 2.7 TB/s; the 2048 x 1024 k and v weights 0.7 TB/s).
The serving runner rewrites the parameters once, at load (`fuse_projections`), and builds the
model with `Transformer(..., fused_projections=True)`:

  wqkv       [layers, D, K, H/K + 2, hd]  kv head j: its H/K query heads (heads j*H/K ...), its key,
                                          its value; split over kv heads (`attention.QKV_AXES`), so
                                          a tensor-parallel device keeps the heads it had
  bqkv       [layers, K, H/K + 2, hd]     the biases likewise (`model.qkv_bias`)
  w_gate_up  [layers, D, 2, F]            gate then up, split over F as before

Query head i reads kv head i // (H/K), as in the separate layout, so the two compute the same.

The RMSNorm before each fused product has its scale folded into the product's weight (row d of
wqkv and w_gate_up times scale[d]; the norm's parameter is dropped): norm(x) @ w is
rms_factor(x) * (x @ (scale * w)), so the product reads the residual stream itself and the factor,
one number per row, multiplies its output where RoPE or SwiGLU reads it. A decode step then runs no
kernel that only normalises a row (two per layer). An MoE block keeps its MLP norm (the router reads
the normed rows). The final norm folds into an untied output projection (`lm_head`) the same way;
tied to the embedding table, it stays.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from configs import ModelConfig


def fold_scale(w: jax.Array, scale_LxD: jax.Array) -> jax.Array:
  """A stacked weight [L, D, ...] with row d of layer l times scale[l, d] (in float32, returned in
  w's dtype): the weight that reads normed rows, made to read the rows before the norm's scale."""
  s = scale_LxD.astype(jnp.float32).reshape(scale_LxD.shape + (1,) * (w.ndim - 2))
  return (w.astype(jnp.float32) * s).astype(w.dtype)


def fuse_attention(cfg: ModelConfig, attn: dict, norm_scale_LxD: jax.Array) -> dict:
  """A stacked attention parameter dict (wq, wk, wv[, bq, bk, bv], ...) in the fused layout, with
  the scale of the norm before it folded in."""
  k, g = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads
  out = {name: a for name, a in attn.items() if name not in ("wq", "wk", "wv", "bq", "bk", "bv")}
  wq = attn["wq"].reshape(*attn["wq"].shape[:2], k, g, attn["wq"].shape[-1])  # [L, D, K, G, hd]
  wqkv = jnp.concatenate([wq, attn["wk"][:, :, :, None], attn["wv"][:, :, :, None]], axis=3)
  out["wqkv"] = fold_scale(wqkv, norm_scale_LxD)
  if "bq" in attn:
    bq = attn["bq"].reshape(attn["bq"].shape[0], k, g, attn["bq"].shape[-1])  # [L, K, G, hd]
    out["bqkv"] = jnp.concatenate([bq, attn["bk"][:, :, None], attn["bv"][:, :, None]], axis=2)
  return out


def fuse_mlp(mlp: dict, norm_scale_LxD: jax.Array) -> dict:
  """A stacked dense MLP parameter dict (w_gate, w_up, w_down) in the fused layout, with the scale
  of the norm before it folded in."""
  w_gate_up = jnp.stack([mlp["w_gate"], mlp["w_up"]], axis=2)
  return {"w_gate_up": fold_scale(w_gate_up, norm_scale_LxD), "w_down": mlp["w_down"]}


def fuse_projections(cfg: ModelConfig, params: dict[str, Any]) -> dict[str, Any]:
  """The parameters of `Transformer(cfg)` (a pure dict) as those of `Transformer(cfg,
  fused_projections=True)`: every block's attention fused, and the MLP of the dense blocks, each
  with the scale of the norm before it folded in; an untied output projection takes the final
  norm's scale likewise."""
  out = dict(params)
  if not cfg.tie_embeddings:
    out["lm_head"] = fold_scale(params["lm_head"][None], params["final_norm"]["scale"][None])[0]
    del out["final_norm"]
  for stack in ("layers", "moe_layers"):
    if stack in params:
      blocks = dict(params[stack])
      blocks["attn"] = fuse_attention(cfg, blocks["attn"], blocks.pop("attn_norm")["scale"])
      if stack == "layers":
        blocks["mlp"] = fuse_mlp(blocks["mlp"], blocks.pop("mlp_norm")["scale"])
      out[stack] = blocks
  return out
