"""Fused (cuDNN flash attention) block forward and backward on NVIDIA GPUs, for the ring ops.

A ring step needs two things the public `jax.nn.dot_product_attention` does not give: the block's
log-sum-exp in float32 (its `return_residual` casts it to the output dtype), and a backward that
takes the *final* output and log-sum-exp of the rows (FlashAttention's backward recomputes the
probabilities from them, which is what makes a blockwise backward exact). Both exist as JAX's
internal cuDNN primitives, which this file calls directly; it is the one place that depends on
`jax._src.cudnn` (checked with JAX 0.11 on an H100 and an H200). Masks: none, causal on the
block's own indices (a zigzag ring's diagonal block), padding (the first `q_len` rows against the
first `kv_len` keys of each batch row), or packed segments (cuDNN's "THD" layout: causal within
each document of a block's own tokens). `documents.py` runs packed documents with the last two.
Measured facts it relies on (`bench/cudnn_segments_probe.py`): packed segments are right only with
equal query and key offsets (with unequal ones dV is misplaced), and their backward workspace
grows with the number of segment slots times the block length.
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


def _operands(q, causal: bool, lengths, offsets=None):
  """The primitives' operands after q, k, v (bias, sequence lengths, offsets, page tables) and
  their keyword arguments: a causal or no mask; with `lengths` a padding mask; with `offsets` too,
  packed segments (causal within each)."""
  fa = _fa()
  unused = jnp.zeros(0, dtype=q.dtype)
  int32 = lambda xs: tuple(x.astype(jnp.int32) for x in xs)
  if lengths is None:
    mask, extra = (fa.MaskType.CAUSAL if causal else fa.MaskType.NO_MASK), (unused,) * 4
  elif offsets is None:
    mask, extra = fa.MaskType.PADDING, int32(lengths) + (unused, unused)
  else:
    mask, extra = fa.MaskType.PADDING_CAUSAL, int32(lengths) + int32(offsets)
  kwargs = dict(seed=0, dropout_rate=0.0, variadic_args=(False, False), mask_type=mask,
                layout=fa.AttentionLayout.BTNH.value, sliding_window_length=None)
  return (unused, *extra, unused, unused), kwargs


def _forward(q, k, v, causal, scale, lengths=None, offsets=None):
  rest, kwargs = _operands(q, causal, lengths, offsets)
  return _fa()._dot_product_attention_fwd_p_wrapper.bind(q, k, v, *rest, scale=scale, is_training=True, **kwargs)


def _backward(q, k, v, causal, scale, o, stats, do, lengths=None, offsets=None):
  rest, kwargs = _operands(q, causal, lengths, offsets)
  dq, dk, dv = _fa()._dot_product_attention_bwd_p_wrapper.bind(
      q, k, v, *rest, stats.astype(F32), o.astype(q.dtype), do.astype(q.dtype), scale=scale, **kwargs)
  return dq.astype(F32), dk.astype(F32), dv.astype(F32)


def block_forward(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, scale: float) -> tuple[jax.Array, jax.Array]:
  """(output [B, Lq, H, D] in q's dtype, float32 log-sum-exp [B, Lq, H])."""
  out, stats = _forward(q, k, v, causal, scale)
  return out, stats.transpose(0, 2, 1)  # stats are [B, H, Lq]


def block_backward(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, scale: float, o: jax.Array,
                   lse: jax.Array, do: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Float32 (dq, dk, dv) of this block given the rows' final output `o` and float32 LSE [B, Lq, H]."""
  return _backward(q, k, v, causal, scale, o, lse.transpose(0, 2, 1), do)


def padded_forward(q: jax.Array, k: jax.Array, v: jax.Array, q_len: jax.Array, kv_len: jax.Array,
                   scale: float) -> tuple[jax.Array, jax.Array]:
  """As `block_forward` with no causal mask, for rows < q_len[b] against keys < kv_len[b] ([B]
  ints); the other rows' results are undefined (callers mask them)."""
  out, stats = _forward(q, k, v, False, scale, (q_len, kv_len))
  return out, stats.transpose(0, 2, 1)


def padded_backward(q: jax.Array, k: jax.Array, v: jax.Array, q_len: jax.Array, kv_len: jax.Array, scale: float,
                    o: jax.Array, lse: jax.Array, do: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """As `block_backward` for `padded_forward`'s mask; gradients outside it are undefined."""
  return _backward(q, k, v, False, scale, o, lse.transpose(0, 2, 1), do, (q_len, kv_len))


def segment_of_tokens(lengths: jax.Array, starts: jax.Array, length: int) -> jax.Array:
  """int32 [B, L]: the slot of each token's segment (packed segments as in `documents_forward`)."""
  used_starts = jnp.where(lengths > 0, starts, length)  # unused slots start nowhere
  return jnp.sum(jnp.arange(length)[None, :, None] >= used_starts[:, None, :], axis=-1).astype(jnp.int32) - 1


def _offsets(starts: jax.Array) -> jax.Array:
  """[B, M + 1]: the slots' starts and a closing -1, as the primitive takes ragged offsets."""
  return jnp.concatenate([starts, jnp.full((starts.shape[0], 1), -1, starts.dtype)], axis=1)


def documents_forward(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, starts: jax.Array,
                      scale: float) -> tuple[jax.Array, jax.Array]:
  """Causal attention within each of M packed segments of a block's own tokens (q, k, v alike):
  segment m of batch row b is tokens [starts[b, m], starts[b, m] + lengths[b, m]); unused slots
  have length 0. Every token must be in a segment. (output in q's dtype, float32 LSE [B, L, H]).

  cuDNN's packed ("THD") layout with equal query and key offsets; its statistics come per
  segment, [B * M, H, L] with t counted from the segment's start, and are gathered back to
  tokens here. (Unequal offsets misplace dV: measured, so not used.)"""
  b, length, h = q.shape[:3]
  out, stats = _forward(q, k, v, True, scale, (lengths, lengths), (_offsets(starts),) * 2)
  stats = stats.reshape(b, lengths.shape[1], h, length).transpose(0, 1, 3, 2)  # [B, M, t, H]
  seg = segment_of_tokens(lengths, starts, length)
  t = jnp.arange(length)[None, :] - jnp.take_along_axis(starts, seg, axis=1)
  return out, stats[jnp.arange(b)[:, None], seg, t]


def documents_backward(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, starts: jax.Array,
                       scale: float, o: jax.Array, lse: jax.Array, do: jax.Array) -> tuple[jax.Array, ...]:
  """Float32 (dq, dk, dv) of `documents_forward` given the rows' final output and LSE [B, L, H]."""
  b, length, h = q.shape[:3]
  t = jnp.arange(length)
  rows = jnp.minimum(starts[..., None] + t, length - 1)  # [B, M, t]: the token at t in each segment
  stats = jnp.where((t < lengths[..., None])[..., None], lse[jnp.arange(b)[:, None, None], rows], 0.0)
  stats = stats.transpose(0, 1, 3, 2).reshape(b * lengths.shape[1], h, length)
  return _backward(q, k, v, True, scale, o, stats, do, (lengths, lengths), (_offsets(starts),) * 2)
