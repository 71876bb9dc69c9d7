"""The experts family's dispatch: reads the plan's strategies and rule tables, picks the op.

The model's MoE layer calls `experts_mlp` with the tokens, its routing and the expert weights,
and never names a mesh axis or a method:

  one device                 `capacity.capacity_experts` or `dropless.dropless_experts`;
  any mesh with more devices `expert_parallel.expert_parallel_experts`: a `shard_map` over the
                             tokens' axes (the plan's `batch` and `length`) and the experts' axes
                             (its `experts` and `expert_mlp` entries), with the plan's dispatch,
                             all-to-all kind, chunks and grouped matmul.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from parallel.experts.capacity import capacity_experts
from parallel.experts.dropless import dropless_experts
from parallel.experts.expert_parallel import expert_parallel_experts, resolve_all_to_all
from parallel.experts.grouped_matmul import resolve as resolve_grouped_matmul
from parallel.experts.losses import expert_load
from parallel.experts.routing import Routing
from parallel.plan import ShardingPlan


def _expert_axes(plan: ShardingPlan, name: str) -> tuple[str, ...]:
  """The mesh axes (size > 1) the rule tables split `name` over, including any the context is
  already manual over (inside a pipeline stage the weights arrive whole over those)."""
  axes = plan.activations.get(name)
  axes = (axes,) if isinstance(axes, str) else (axes or ())
  return tuple(a for a in axes if plan.mesh.shape[a] > 1)


def experts_mlp(x_TxD: jax.Array, routing: Routing, w_gate_ExDxF: jax.Array, w_up_ExDxF: jax.Array,
                w_down_ExFxD: jax.Array, plan: ShardingPlan, *, compute_dtype=None) -> tuple[jax.Array, dict]:
  """(y [T, D] in the compute dtype, stats) for the T tokens of the whole batch, rows ordered as
  (batch, length) flattened; y_t = sum_k weights[t, k] * SwiGLU_{experts[t, k]}(x_t) over the
  pairs that were not dropped. stats: `tokens_per_expert` [E] float32 (pairs routed to each
  expert, before any drop) and `dropped` (pairs dropped by capacity), float32 scalar.

  Inside a pipeline stage (a context manual over `stage` and the batch axes) T is the shard's
  tokens, the weights arrive whole, and `tokens_per_expert` counts the shard's tokens; `dropped`
  is summed over the shards that dispatch together."""
  s = plan.strategies
  n_experts = w_gate_ExDxF.shape[0]
  stats = {"tokens_per_expert": expert_load(routing.experts, n_experts)}
  one_device = plan.mesh.size == 1 and s.expert_chunks == 1
  grouped = resolve_grouped_matmul(s.grouped_matmul, widths=w_gate_ExDxF.shape[1:], one_device=one_device,
                                   dtype=compute_dtype or x_TxD.dtype)
  args = (x_TxD, routing.weights, routing.experts, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
  if one_device:
    if s.expert_dispatch == "capacity":
      y, dropped = capacity_experts(*args, capacity_factor=s.capacity_factor, compute_dtype=compute_dtype)
    else:
      y, dropped = dropless_experts(*args, grouped_matmul=grouped, compute_dtype=compute_dtype)
  else:
    y, dropped = expert_parallel_experts(
        *args, mesh=plan.op_mesh, token_axes=plan.activation_axes("batch") + plan.activation_axes("length"),
        expert_axes=_expert_axes(plan, "experts"), tensor_axes=plan.activation_axes("expert_mlp"),
        dispatch=s.expert_dispatch, capacity_factor=s.capacity_factor,
        all_to_all=resolve_all_to_all(s.expert_all_to_all), chunks=s.expert_chunks, grouped_matmul=grouped,
        compute_dtype=compute_dtype)
  stats["dropped"] = jnp.asarray(dropped, jnp.float32)
  return y, stats
