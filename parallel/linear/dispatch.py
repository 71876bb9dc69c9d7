"""The linear-attention family's dispatch: local chunked attention on one sequence device, LASP-2
over `seq`. The model calls `linear_attend` and never names the method or an axis."""

from __future__ import annotations

import jax

from parallel.attention.dispatch import SEQ, layout_positions
from parallel.linear.lasp2 import lasp2_attention
from parallel.linear.linear_attention import linear_attention
from parallel.plan import ShardingPlan


def linear_attend(q_BxLxHxD: jax.Array, k_BxLxKxD: jax.Array, v_BxLxKxD: jax.Array, segment_ids_BxL: jax.Array | None,
                  decay_K: jax.Array, *, plan: ShardingPlan, chunk: int) -> jax.Array:
  """Decayed causal linear attention, float32 [B, L, H, D], in the plan's token order."""
  if plan.mesh.shape[SEQ] == 1:
    return linear_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL, decay_K, chunk=chunk)
  return lasp2_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL, decay_K, mesh=plan.op_mesh, axis=SEQ,
                         layout=plan.strategies.layout, batch_axes=plan.activation_axes("batch"),
                         head_axes=plan.activation_axes("heads"), chunk=chunk, positions=layout_positions(plan))
