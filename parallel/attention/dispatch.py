"""The attention family's dispatch: the plan's `attention` strategy picks the op.

The model calls `attend` and never names the method or a mesh axis. Each context-parallel method
adds one entry to `_METHODS` (and its name to `configs.base.ATTENTION_METHODS`).
"""

from __future__ import annotations

import jax

from parallel.attention.dense import dot_product_attention
from parallel.plan import ShardingPlan


def _dense(q, k, v, segment_ids, *, plan, implementation):
  del plan  # the whole sequence is on every device that holds the batch row
  return dot_product_attention(q, k, v, segment_ids, implementation)


_METHODS = {"dense": _dense}


def attend(q_BxLxHxD: jax.Array, k_BxLxKxD: jax.Array, v_BxLxKxD: jax.Array, segment_ids_BxL: jax.Array | None,
           *, plan: ShardingPlan, implementation: str) -> jax.Array:
  """Causal (document-masked when segment ids are given) GQA attention, [B, L, H, D]."""
  return _METHODS[plan.strategies.attention](q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL, plan=plan,
                                             implementation=implementation)
