"""The attention family's dispatch: the plan's `attention` strategy picks the op.

The model calls `attend` and never names the method or a mesh axis; the loss calls `order_batch`
once per batch, which lays the tokens out in the order the method expects over `seq` (the
causal load-balancing layout; positions, segment ids, targets and mask move with the tokens).
Each context-parallel method is one entry of `_METHODS` (and its name in
`configs.base.ATTENTION_METHODS`).
"""

from __future__ import annotations

import functools

import jax

from parallel.attention.allgather import allgather_attention
from parallel.attention.dense import dot_product_attention
from parallel.attention.layout import permute_batch
from parallel.attention.ring import ring_attention
from parallel.attention.tokenring import tokenring_attention
from parallel.attention.ulysses import ulysses_attention
from parallel.attention.usp import usp_attention
from parallel.plan import ShardingPlan

# "lasp2" (LASP-2H) runs its softmax layers with the all-gather op; its linear layers go through
# `parallel.linear.dispatch`.
_METHODS = {"allgather": allgather_attention, "ring": ring_attention, "tokenring": tokenring_attention,
            "ulysses": ulysses_attention, "usp": usp_attention, "lasp2": allgather_attention}
SEQ = "seq"


def layout_positions(plan: ShardingPlan) -> int:
  """How many positions the layout spreads the sequence over (USP: one per Ulysses group)."""
  return plan.mesh.shape[SEQ] // plan.strategies.ulysses


def order_batch(batch: dict, plan: ShardingPlan) -> dict:
  """Permutes every [B, L] array of a batch into the plan's token layout over `seq`."""
  if plan.strategies.attention == "dense" or plan.mesh.shape[SEQ] == 1:
    return batch
  return permute_batch(batch, plan.strategies.layout, layout_positions(plan))


def attend(q_BxLxHxD: jax.Array, k_BxLxKxD: jax.Array, v_BxLxKxD: jax.Array, segment_ids_BxL: jax.Array | None,
           *, plan: ShardingPlan, implementation: str) -> jax.Array:
  """Causal (document-masked when segment ids are given) GQA attention, [B, L, H, D]."""
  method = plan.strategies.attention
  if method == "dense" or plan.mesh.shape[SEQ] == 1:  # the whole sequence is on each device
    return dot_product_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL, implementation)
  op = _METHODS[method]
  if method == "usp":
    op = functools.partial(op, ulysses=plan.strategies.ulysses)
  op = functools.partial(op, implementation=implementation)
  return op(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL, mesh=plan.op_mesh, axis=SEQ,
            layout=plan.strategies.layout, batch_axes=plan.activation_axes("batch"),
            head_axes=plan.activation_axes("heads"))
