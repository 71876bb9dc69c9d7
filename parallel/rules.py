"""Logical-axis rule tables: the one place that maps model dimension names to mesh axes.

Model code names dimensions (`batch`, `length`, `residual_length`, `embed`, `heads`, `kv_heads`,
`head_dim`, `mlp`, `vocab`, `layers`); a `ShardingPlan` holds one table for each kind of array:

  params      where parameters live between steps (ZeRO-3/FSDP shards `embed` over `fsdp`)
  grads       where gradients are reduced to (ZeRO-2 and up: reduce-scatter over `fsdp`)
  opt_state   where Adam moments live (ZeRO-1 and up: sharded over `fsdp`)
  activations where activations are constrained inside the model

DDP, ZeRO-1/2/3 (Rajbhandari et al., "ZeRO"), hierarchical sharding (shard over `fsdp` inside an
island, replicate over `data`: ZeRO++ hpZ), Megatron tensor parallelism (Shoeybi et al.) and its
sequence parallelism (Korthikanti et al.) are all choices of these tables; XLA inserts the
all-gathers, reduce-scatters and all-reduces they imply.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes]
LogicalAxes = tuple[str | None, ...]

BATCH_AXES = ("replica", "data", "fsdp")

# Megatron tensor parallelism: attention heads, MLP hidden units and (optionally) the vocabulary
# are split over `tensor`; everything else is replicated.
_TENSOR_RULES: dict[str, MeshAxes] = {
    "layers": None, "embed": None, "head_dim": None,
    "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor",
}


def _is_axes(x: Any) -> bool:
  return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
  """A mesh plus the four rule tables. Immutable; build it with `make_plan`."""

  mesh: Mesh
  params: Rules
  grads: Rules
  opt_state: Rules
  activations: Rules

  def spec(self, axes: LogicalAxes, rules: Rules, shape: tuple[int, ...] | None = None) -> P:
    """Logical axes -> PartitionSpec; checks that each sharded dimension divides evenly."""
    out, used = [], set()
    for i, name in enumerate(axes):
      mesh_axes = rules.get(name) if name is not None else None
      if isinstance(mesh_axes, str):
        mesh_axes = (mesh_axes,)
      # Axes of size 1 shard nothing; leaving them out keeps specs readable.
      kept = tuple(a for a in (mesh_axes or ()) if self.mesh.shape[a] > 1)
      for a in kept:
        if a in used:
          raise ValueError(f"logical axes {axes} map mesh axis {a!r} twice")
        used.add(a)
      if shape is not None and kept:
        size = 1
        for a in kept:
          size *= self.mesh.shape[a]
        if shape[i] % size:
          raise ValueError(f"dimension {name!r} of size {shape[i]} (shape {shape}) does not divide "
                           f"over mesh axes {kept} of total size {size}")
      out.append(kept[0] if len(kept) == 1 else (kept or None))
    return P(*out)

  def sharding(self, axes: LogicalAxes, rules: Rules, shape: tuple[int, ...] | None = None) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(axes, rules, shape))

  def tree_shardings(self, axes_tree: Any, shapes_tree: Any, rules: Rules) -> Any:
    """A pytree of logical-axes tuples (+ matching shapes) -> a pytree of NamedShardings."""
    return jax.tree.map(lambda ax, x: self.sharding(ax, rules, tuple(x.shape)), axes_tree, shapes_tree,
                        is_leaf=_is_axes)

  def constrain(self, x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """Pins an activation to the layout the activation table gives it."""
    return jax.lax.with_sharding_constraint(x, self.sharding(axes, self.activations, x.shape))

  def constrain_weight(self, x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """Pins a weight to the layout the `params` table gives it: where the model computes with it."""
    return jax.lax.with_sharding_constraint(x, self.sharding(axes, self.params, x.shape))

  def mesh_axes(self, name: str) -> tuple[str, ...]:
    """The mesh axes (size > 1) an activation dimension is split over; () if none."""
    axes = self.activations.get(name)
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    return tuple(a for a in axes if self.mesh.shape[a] > 1)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())


def make_plan(mesh: Mesh, *, zero_stage: int = 0, sequence_parallel: bool = False,
              vocab_parallel: bool = True) -> ShardingPlan:
  """Builds the rule tables for a ZeRO stage with Megatron TP (+SP) over whatever axes `mesh` has."""
  if zero_stage not in (0, 1, 2, 3):
    raise ValueError(f"zero_stage={zero_stage}: choose 0, 1, 2 or 3")
  tensor = dict(_TENSOR_RULES)
  if not vocab_parallel:
    tensor["vocab"] = None
  zero = {**tensor, "embed": "fsdp"}
  activations = {
      **tensor,
      "batch": BATCH_AXES,
      "length": None,
      # Megatron SP: outside attention and MLP, the residual stream and its norms are split on
      # length over `tensor`; the all-reduce after each row-parallel matmul becomes a
      # reduce-scatter, and an all-gather precedes the next column-parallel matmul.
      "residual_length": "tensor" if sequence_parallel else None,
  }
  return ShardingPlan(
      mesh=mesh,
      params=zero if zero_stage >= 3 else tensor,
      grads=zero if zero_stage >= 2 else tensor,
      opt_state=zero if zero_stage >= 1 else tensor,
      activations=activations,
  )
