"""Causal linear attention with a per-head decay, in chunked form (RetNet's retention; Lightning
Attention's intra/inter-chunk split), with packed documents.

For each key/value head with decay g in (0, 1), and tokens t of one document:

  S_t = g * S_{t-1} + k_t^T v_t          (state [D, Dv]; reset to 0 at a document's first token)
  o_t = q_t S_t                           (q scaled by 1/sqrt(D); GQA: query heads share a state)

computed a chunk of `chunk` tokens at a time: inside a chunk as a masked quadratic form, across
chunks through the state (so the cost is linear in length). Segment ids must be non-decreasing
along a row (as packing produces them): a document is a run of equal ids.

`span` below is a contiguous stretch of the original sequence that one call handles, given the
state its first token inherits: the state at the token just before the span, which applies only
to tokens still in that token's document.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32


def decay_rates(kv_heads: int) -> np.ndarray:
  """RetNet's per-head decays: 1 - 2^-5, 1 - 2^-6, ... (float32 [K])."""
  return (1.0 - 2.0 ** (-5.0 - np.arange(kv_heads))).astype(np.float32)


def _grouped(q, kv_heads):
  b, l, h, d = q.shape
  return q.reshape(b, l, kv_heads, h // kv_heads, d)


def span_state(k: jax.Array, v: jax.Array, segment_ids: jax.Array, decay: jax.Array) -> jax.Array:
  """float32 [B, K, D, Dv]: the state at the span's last token, counting only the span's tokens
  (those of the last token's document, decayed by their distance to it)."""
  t = k.shape[1]
  last = segment_ids[:, -1:]
  dist = (t - 1 - jnp.arange(t)).astype(F32)
  w = jnp.where(segment_ids == last, 1.0, 0.0)[:, :, None] * decay[None, None, :] ** dist[None, :, None]  # [B, T, K]
  return jnp.einsum("btkd,btke->bkde", k.astype(F32) * w[..., None], v.astype(F32))


def span_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, decay: jax.Array,
                   state_in: jax.Array, segment_before: jax.Array, chunk: int) -> jax.Array:
  """float32 [B, T, H, Dv] outputs of one span.

  Args:
    q [B, T, H, D], k and v [B, T, K, D(v)], segment_ids int [B, T] (non-decreasing),
    decay float32 [K], state_in float32 [B, K, D, Dv] (the state at the token before the span),
    segment_before int [B] (that token's segment id; -1 for none).
  """
  b, t, h, d = q.shape
  kh = k.shape[2]
  c = chunk if t % chunk == 0 else t
  scale = d ** -0.5
  split = lambda x: x.reshape(b, t // c, c, *x.shape[2:]).swapaxes(0, 1)  # [chunks, B, c, ...]
  j = jnp.arange(c)
  causal = j[:, None] >= j[None, :]
  dist = (j[:, None] - j[None, :]).astype(F32)
  intra_decay = jnp.where(causal[None], decay[:, None, None] ** jnp.maximum(dist, 0.0)[None], 0.0)  # [K, c, c]
  in_decay = decay[:, None] ** (j + 1).astype(F32)[None]  # [K, c]: from the state before the chunk
  out_decay = decay[:, None] ** (c - 1 - j).astype(F32)[None]  # [K, c]: to the chunk's last token

  def step(carry, xs):
    state, seg_prev = carry
    qc, kc, vc, sc = xs
    qg = _grouped(qc.astype(F32) * scale, kh)  # [B, c, K, G, D]
    same = sc[:, :, None] == sc[:, None, :]  # [B, c, c]
    scores = jnp.einsum("bjkgd,bikd->bkgji", qg, kc.astype(F32))
    scores = scores * intra_decay[None, :, None] * same[:, None, None]
    o = jnp.einsum("bkgji,bike->bjkge", scores, vc.astype(F32))
    carried = (sc == seg_prev[:, None]).astype(F32)[:, :, None] * in_decay.T[None]  # [B, c, K]
    o = o + jnp.einsum("bjkgd,bkde->bjkge", qg, state) * carried[:, :, :, None, None]
    last = sc[:, -1]
    keep = ((last == seg_prev).astype(F32)[:, None] * decay[None] ** c)[:, :, None, None]  # whole chunk one document
    weights = (sc == last[:, None]).astype(F32)[:, :, None] * out_decay.T[None]  # [B, c, K]
    state = keep * state + jnp.einsum("bikd,bike->bkde", kc.astype(F32) * weights[..., None], vc.astype(F32))
    return (state, last), o.reshape(b, c, h, -1)

  _, out = jax.lax.scan(step, (state_in.astype(F32), segment_before), (split(q), split(k), split(v), split(segment_ids)))
  return out.swapaxes(0, 1).reshape(b, t, h, -1)


def linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, decay: jax.Array,
                     chunk: int = 64) -> jax.Array:
  """The whole sequence on one device: float32 [B, L, H, Dv]."""
  b = q.shape[0]
  seg = jnp.zeros(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids
  state = jnp.zeros((b, k.shape[2], k.shape[3], v.shape[3]), F32)
  return span_attention(q, k, v, seg, jnp.asarray(decay, F32), state, jnp.full((b,), -1, seg.dtype), chunk)
