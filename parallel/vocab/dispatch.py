"""The vocabulary family's dispatch: reads the plan, picks the dense or vocabulary-parallel op.

The model's embedding and the loss call these two functions and never name a mesh axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from parallel.plan import ShardingPlan
from parallel.vocab.dense import cross_entropy
from parallel.vocab.vocab_parallel import vocab_parallel_cross_entropy, vocab_parallel_embed


def _vocab_axis(plan: ShardingPlan) -> str | None:
  axes = plan.activation_axes("vocab")
  if len(axes) > 1:
    raise ValueError(f"the vocabulary is split over {axes}; the vocabulary-parallel ops take one axis")
  return axes[0] if axes else None


def embed_lookup(table_VxD: jax.Array, ids_BxL: jax.Array, plan: ShardingPlan) -> jax.Array:
  """Embedding rows [B, L, D]; vocabulary-parallel when the plan splits `vocab` over an axis."""
  axis = _vocab_axis(plan)
  if axis is None:
    return jnp.take(table_VxD, ids_BxL, axis=0)
  length = plan.activation_axes("length")
  return vocab_parallel_embed(table_VxD, ids_BxL, mesh=plan.op_mesh, axis=axis, batch_axes=plan.activation_axes("batch"),
                              length_axes=length,
                              scatter_length=plan.activation_axes("residual_length") == (*length, axis))


def token_cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array, plan: ShardingPlan) -> jax.Array:
  """Float32 per-token cross-entropy [B, L]; vocabulary-parallel when the plan splits `vocab`."""
  axis = _vocab_axis(plan)
  if axis is None:
    return cross_entropy(logits_BxLxV, targets_BxL)
  return vocab_parallel_cross_entropy(logits_BxLxV, targets_BxL, mesh=plan.op_mesh, axis=axis,
                                      batch_axes=plan.activation_axes("batch"),
                                      length_axes=plan.activation_axes("length"))
