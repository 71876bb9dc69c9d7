"""Fused (cuDNN flash attention) block forward and backward on NVIDIA GPUs, for the ring ops.

A ring step needs two things the public `jax.nn.dot_product_attention` does not give: the block's
log-sum-exp in float32 (its `return_residual` casts it to the output dtype), and a backward that
takes the *final* output and log-sum-exp of the rows (FlashAttention's backward recomputes the
probabilities from them, which is what makes a blockwise backward exact). Both exist as JAX's
internal cuDNN primitives, which this file calls directly; it is the one place that depends on
`jax._src.cudnn` (checked with JAX 0.11 on an H100). Masks: none, causal on the block's own
indices (a zigzag ring's diagonal block), or padding: the first `q_len` rows against the first
`kv_len` keys of each batch row, which is how `documents.py` runs packed documents (cuDNN's packed
"THD" segments were measured and not used: a backward workspace that grows with the number of
segments times the block length, and key/value gradients misplaced when a segment's key offset
differs from its query offset).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

F32 = jnp.float32


@functools.cache
def _fa():
  from jax._src.cudnn import fused_attention_stablehlo as fa  # noqa: PLC0415 - internal, GPU only
  return fa


def available() -> bool:
  """Whether cuDNN flash attention can run here (an NVIDIA GPU with cuDNN)."""
  if jax.default_backend() != "gpu":
    return False
  try:
    _fa().check_cudnn_version()
  except Exception:  # noqa: BLE001 - no cuDNN, or the internal module moved
    return False
  return True


def _operands(q, causal: bool, lengths):
  """The primitives' operands after q, k, v (bias, sequence lengths, offsets, page tables) and
  their keyword arguments, for a causal, unmasked or (with `lengths`) padding mask."""
  fa = _fa()
  unused = jnp.zeros(0, dtype=q.dtype)
  if lengths is None:
    mask, seqlens = (fa.MaskType.CAUSAL if causal else fa.MaskType.NO_MASK), (unused, unused)
  else:
    mask, seqlens = fa.MaskType.PADDING, tuple(x.astype(jnp.int32) for x in lengths)
  kwargs = dict(seed=0, dropout_rate=0.0, variadic_args=(False, False), mask_type=mask,
                layout=fa.AttentionLayout.BTNH.value, sliding_window_length=None)
  return (unused, *seqlens, unused, unused, unused, unused), kwargs


def _forward(q, k, v, causal, scale, lengths=None):
  rest, kwargs = _operands(q, causal, lengths)
  out, stats = _fa()._dot_product_attention_fwd_p_wrapper.bind(q, k, v, *rest, scale=scale, is_training=True,
                                                               **kwargs)
  return out, stats.transpose(0, 2, 1)  # stats are [B, H, Lq]


def _backward(q, k, v, causal, scale, o, lse, do, lengths=None):
  rest, kwargs = _operands(q, causal, lengths)
  dq, dk, dv = _fa()._dot_product_attention_bwd_p_wrapper.bind(
      q, k, v, *rest, lse.transpose(0, 2, 1).astype(F32), o.astype(q.dtype), do.astype(q.dtype), scale=scale,
      **kwargs)
  return dq.astype(F32), dk.astype(F32), dv.astype(F32)


def block_forward(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, scale: float) -> tuple[jax.Array, jax.Array]:
  """(output [B, Lq, H, D] in q's dtype, float32 log-sum-exp [B, Lq, H])."""
  return _forward(q, k, v, causal, scale)


def block_backward(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, scale: float, o: jax.Array,
                   lse: jax.Array, do: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Float32 (dq, dk, dv) of this block given the rows' final output `o` and float32 LSE [B, Lq, H]."""
  return _backward(q, k, v, causal, scale, o, lse, do)


def padded_forward(q: jax.Array, k: jax.Array, v: jax.Array, q_len: jax.Array, kv_len: jax.Array,
                   scale: float) -> tuple[jax.Array, jax.Array]:
  """As `block_forward` with no causal mask, for rows < q_len[b] against keys < kv_len[b] ([B]
  ints); the other rows' results are undefined (callers mask them)."""
  return _forward(q, k, v, False, scale, (q_len, kv_len))


def padded_backward(q: jax.Array, k: jax.Array, v: jax.Array, q_len: jax.Array, kv_len: jax.Array, scale: float,
                    o: jax.Array, lse: jax.Array, do: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """As `block_backward` for `padded_forward`'s mask; gradients outside it are undefined."""
  return _backward(q, k, v, False, scale, o, lse, do, (q_len, kv_len))
