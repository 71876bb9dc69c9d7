"""Dense (single-device) cross-entropy and the target pick the vocabulary-parallel op shares."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pick_target(logits_BxLxV: jax.Array, index_BxL: jax.Array) -> jax.Array:
  """logits[b, l, index[b, l]] as a masked sum over the vocabulary (exact: the rest adds zeros).

  An index outside [0, V) picks 0. The gradient is a select, which XLA fuses with the softmax's
  into one pass that writes the logits' gradient in their own dtype; `take_along_axis` would
  scatter into a float32 buffer the size of the logits instead.
  """
  vocab = jax.lax.broadcasted_iota(index_BxL.dtype, logits_BxLxV.shape, logits_BxLxV.ndim - 1)
  return jnp.sum(jnp.where(vocab == index_BxL[..., None], logits_BxLxV, 0.0), axis=-1)


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """Float32 per-token cross-entropy -log softmax(logits)[target], [B, L]."""
  logits = logits_BxLxV.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  return lse - pick_target(logits, targets_BxL)
