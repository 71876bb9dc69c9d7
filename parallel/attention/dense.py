"""Dense causal attention: every query sees the whole (local) sequence. The reference every
context-parallel method is checked against, and the op of the `dense` strategy."""

from __future__ import annotations

import jax


def dot_product_attention(q_BxLxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array,
                          segment_ids_BxL: jax.Array | None, implementation: str = "xla") -> jax.Array:
  """Causal attention; with segment ids, tokens attend only within their own document.

  GQA/MQA: H query heads share K key/value heads (H % K == 0). `implementation` is "xla" (any
  backend) or "cudnn" (flash attention on NVIDIA GPUs). Returns [B, L, H, D].
  """
  mask = None
  if segment_ids_BxL is not None:
    mask = segment_ids_BxL[:, None, :, None] == segment_ids_BxL[:, None, None, :]
  return jax.nn.dot_product_attention(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, mask=mask, is_causal=True,
                                      implementation=implementation)
