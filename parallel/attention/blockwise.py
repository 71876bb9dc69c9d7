"""Attention of one query block against one key/value block, with its log-sum-exp, and the
backward of such a block given the full row statistics: the pieces that ring attention and its
successors merge (Milakov & Gimelshein's online softmax; FlashAttention's backward).

Shapes: q [B, Lq, H, D], k and v [B, Lk, K, D] with H % K == 0 (GQA/MQA); the mask is bool
[B, Lq, Lk]. Statistics are float32 [B, Lq, H]. Rows a block masks out entirely get the finite
log-sum-exp `NEG`: merging then gives them zero weight against any block that sees something,
with no inf - inf along the way. This is the plain-XLA path (any backend); fused kernels can
replace `block_forward` and `block_backward` one for one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = -1e30  # the log-sum-exp (and score) of nothing: finite, so differences stay finite
F32 = jnp.float32


def attention_mask(q_index: jax.Array, kv_index: jax.Array, q_segments: jax.Array | None,
                   kv_segments: jax.Array | None, causal: bool = True) -> jax.Array:
  """bool [B or 1, Lq, Lk]: key j is visible to query i (by original indices, and same document)."""
  mask = (kv_index[None, :] <= q_index[:, None]) if causal else jnp.ones((q_index.size, kv_index.size), bool)
  mask = mask[None]
  if q_segments is not None:
    mask = mask & (q_segments[:, :, None] == kv_segments[:, None, :])
  return mask


def _grouped(q: jax.Array, kv_heads: int) -> jax.Array:
  b, l, h, d = q.shape
  return q.reshape(b, l, kv_heads, h // kv_heads, d)


def _scores(q, k, mask, scale):
  """Masked float32 scores [B, K, G, Lq, Lk]."""
  s = jnp.einsum("bqkgd,bskd->bkgqs", _grouped(q, k.shape[2]), k, preferred_element_type=F32) * scale
  return jnp.where(mask[:, None, None], s, NEG)


def _to_rows(x_BxKxGxL: jax.Array) -> jax.Array:
  b, k, g, l = x_BxKxGxL.shape
  return x_BxKxGxL.transpose(0, 3, 1, 2).reshape(b, l, k * g)


def _from_rows(x_BxLxH: jax.Array, kv_heads: int) -> jax.Array:
  b, l, h = x_BxLxH.shape
  return x_BxLxH.reshape(b, l, kv_heads, h // kv_heads).transpose(0, 2, 3, 1)


def block_forward(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
  """(float32 output normalised within the block [B, Lq, H, D], float32 log-sum-exp [B, Lq, H])."""
  s = _scores(q, k, mask, scale)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - m)
  denom = jnp.sum(p, axis=-1)
  o = jnp.einsum("bkgqs,bskd->bqkgd", p.astype(v.dtype), v, preferred_element_type=F32)
  o = o / _to_rows(denom)[..., None].reshape(o.shape[:-1] + (1,))
  lse = _to_rows(m[..., 0] + jnp.log(denom))
  return o.reshape(q.shape[:3] + (v.shape[-1],)), lse


def block_backward(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, lse: jax.Array,
                   delta: jax.Array, do: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Float32 (dq, dk, dv) of this block's share, given the rows' full log-sum-exp [B, Lq, H] and
  delta = sum(dO * O, -1) [B, Lq, H] over the final output O."""
  kv_heads = k.shape[2]
  s = _scores(q, k, mask, scale)
  p = jnp.exp(s - _from_rows(lse, kv_heads)[..., None])
  do_g = _grouped(do, kv_heads)
  dv = jnp.einsum("bkgqs,bqkgd->bskd", p.astype(do.dtype), do_g, preferred_element_type=F32)
  dp = jnp.einsum("bqkgd,bskd->bkgqs", do_g, v, preferred_element_type=F32)
  ds = p * (dp - _from_rows(delta, kv_heads)[..., None])
  dq = jnp.einsum("bkgqs,bskd->bqkgd", ds.astype(k.dtype), k, preferred_element_type=F32) * scale
  dk = jnp.einsum("bkgqs,bqkgd->bskd", ds.astype(q.dtype), _grouped(q, kv_heads), preferred_element_type=F32) * scale
  return dq.reshape(q.shape), dk, dv


def merge(o: jax.Array, lse: jax.Array, o_block: jax.Array, lse_block: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Combines two partial results over disjoint key sets by their log-sum-exps (all float32)."""
  new = jnp.logaddexp(lse, lse_block)
  w_old, w_new = jnp.exp(lse - new)[..., None], jnp.exp(lse_block - new)[..., None]
  return o * w_old + o_block * w_new, new
