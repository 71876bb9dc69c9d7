"""The fused-kernel interface of `cudnn_blocks.py` in plain XLA (any backend).

A ring whose blocks run on fused kernels takes different routes from one that masks XLA blocks
by original index and segment ids: causal masks on a block's local order, and packed documents
as padding-masked calls on rolled keys and packed-segment calls (`documents.py`). These twins
take the same arguments and give the same results as the cuDNN calls, so those routes run, and
are tested, on CPUs (`implementation="xla_kernels"`). Outputs are float32 here (cuDNN returns the input dtype).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from parallel.attention import blockwise, cudnn_blocks
from parallel.attention.blockwise import F32


def _causal(lq: int, lk: int, causal: bool) -> jax.Array:
  """bool [1, Lq, Lk]: causal on local indices, or everything."""
  return jnp.tril(jnp.ones((lq, lk), bool))[None] if causal else jnp.ones((1, lq, lk), bool)


def length_mask(q_len: jax.Array, kv_len: jax.Array, lq: int, lk: int) -> jax.Array:
  """bool [B, Lq, Lk]: row i sees key j when i < q_len[b] and j < kv_len[b] (a padding mask)."""
  rows = jnp.arange(lq)[None, :, None] < q_len[:, None, None]
  return rows & (jnp.arange(lk)[None, None, :] < kv_len[:, None, None])


def _backward(q, k, v, mask, scale, o, lse, do):
  delta = jnp.sum(do.astype(F32) * o.astype(F32), axis=-1)  # from the final output, as cuDNN does
  return blockwise.block_backward(q, k, v, mask, scale, lse, delta, do)


def block_forward(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, scale: float) -> tuple[jax.Array, jax.Array]:
  return blockwise.block_forward(q, k, v, _causal(q.shape[1], k.shape[1], causal), scale)


def block_backward(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, scale: float, o: jax.Array,
                   lse: jax.Array, do: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  return _backward(q, k, v, _causal(q.shape[1], k.shape[1], causal), scale, o, lse, do)


def padded_forward(q: jax.Array, k: jax.Array, v: jax.Array, q_len: jax.Array, kv_len: jax.Array,
                   scale: float) -> tuple[jax.Array, jax.Array]:
  return blockwise.block_forward(q, k, v, length_mask(q_len, kv_len, q.shape[1], k.shape[1]), scale)


def padded_backward(q: jax.Array, k: jax.Array, v: jax.Array, q_len: jax.Array, kv_len: jax.Array, scale: float,
                    o: jax.Array, lse: jax.Array, do: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  return _backward(q, k, v, length_mask(q_len, kv_len, q.shape[1], k.shape[1]), scale, o, lse, do)


def _document_mask(lengths: jax.Array, starts: jax.Array, length: int) -> jax.Array:
  """bool [B, L, L]: causal within each packed segment (`cudnn_blocks.documents_forward`)."""
  seg = cudnn_blocks.segment_of_tokens(lengths, starts, length)
  end = jnp.take_along_axis(starts + lengths, seg, axis=1)
  seg = jnp.where(jnp.arange(length)[None, :] < end, seg, -1)  # tokens past their segment's length: none
  same = (seg[:, :, None] == seg[:, None, :]) & (seg >= 0)[:, :, None]
  return same & jnp.tril(jnp.ones((length, length), bool))[None]


def documents_forward(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, starts: jax.Array,
                      scale: float) -> tuple[jax.Array, jax.Array]:
  return blockwise.block_forward(q, k, v, _document_mask(lengths, starts, q.shape[1]), scale)


def documents_backward(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, starts: jax.Array,
                       scale: float, o: jax.Array, lse: jax.Array, do: jax.Array) -> tuple[jax.Array, ...]:
  return _backward(q, k, v, _document_mask(lengths, starts, q.shape[1]), scale, o, lse, do)
