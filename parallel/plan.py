"""`ShardingPlan`: the one object that carries a run's parallel choices.

A plan holds a mesh, four rule tables mapping logical dimension names (`batch`, `length`,
`residual_length`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`, `layers`) to mesh
axes, and the named strategies that are not tables:

  params      where parameters live between steps (ZeRO-3/FSDP shards `embed` over `fsdp`)
  grads       where gradients are reduced to (ZeRO-2 and up: reduce-scatter over `fsdp`)
  opt_state   where Adam moments live (ZeRO-1 and up: sharded over `fsdp`)
  activations where activations are constrained inside the model
  strategies  which attention op runs over `seq`, which pipeline schedule over `stage`, which
              algorithm over `replica`

It is built once per run by `plan_from_config`; model and step read it through one small
dispatch per op family (`parallel/<family>/dispatch.py`), never through the config. A
single-device plan is a plan like any other (`single_device_plan`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs.base import (ATTENTION_METHODS, CONTEXT_LAYOUTS, EXPERT_ALL_TO_ALL, EXPERT_DISPATCHES, GROUPED_MATMULS,
                          PIPELINE_SCHEDULES, REPLICA_ALGORITHMS, Config)
from configs.validate.pipeline import chunks as pipeline_chunks
from parallel.mesh import single_device_mesh
from parallel.rules import Rules
from parallel.rules.experts import expert_rules
from parallel.rules.megatron import activation_rules, tensor_rules
from parallel.rules.zero import zero_tables

LogicalAxes = tuple[str | None, ...]
TOKEN_AXES = ("batch", "length")  # logical axes of every [batch, length] input of a batch


def _manual_context():
  """The context's abstract mesh if some of its axes are manual (inside a shard_map), else None."""
  mesh = jax.sharding.get_abstract_mesh()
  return mesh if mesh.axis_names and mesh.manual_axes else None


def _manual_axes() -> frozenset[str]:
  """The axes the context is manual over (a pipeline's `stage` and batch axes), else none."""
  mesh = _manual_context()
  return frozenset(mesh.manual_axes) if mesh is not None else frozenset()


def _is_axes(x: Any) -> bool:
  return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


@dataclasses.dataclass(frozen=True)
class Strategies:
  """The plan's named choices, one per family (choices: `configs.base`).

  attention  the op over `seq` (context parallelism), with `layout`, the token order over the
             `seq` devices it expects, and `ulysses`, USP's devices per Ulysses group
  pipeline   the schedule over `stage` ("none": no pipeline), with `virtual_stages` layer chunks
             per stage and `pipeline_vocab`: the embedding and output layer split on the
             vocabulary over all stages (vocabulary parallelism), not on the first and last
  replica    what runs over `replica` ("sync": gradients all-reduced every step)
  experts    how routed tokens reach their experts (`expert_dispatch`: capacity or dropless, with
             `capacity_factor`), the all-to-all kind over the expert axes (`expert_all_to_all`), the
             chunks the dispatch is cut into to overlap communication and compute
             (`expert_chunks`) and the dropless grouped matmul (`grouped_matmul`); which axes
             split the experts is the rule tables' `experts` and `expert_mlp` entries
  """

  attention: str = "dense"
  layout: str = "contiguous"
  ulysses: int = 1
  pipeline: str = "none"
  virtual_stages: int = 1
  pipeline_vocab: bool = False
  replica: str = "sync"
  expert_dispatch: str = "dropless"
  capacity_factor: float = 1.25
  expert_all_to_all: str = "auto"
  expert_chunks: int = 1
  grouped_matmul: str = "auto"

  def __post_init__(self):
    for name, choices in (("attention", ATTENTION_METHODS), ("layout", CONTEXT_LAYOUTS),
                          ("pipeline", PIPELINE_SCHEDULES), ("replica", REPLICA_ALGORITHMS),
                          ("expert_dispatch", EXPERT_DISPATCHES), ("expert_all_to_all", EXPERT_ALL_TO_ALL),
                          ("grouped_matmul", GROUPED_MATMULS)):
      if getattr(self, name) not in choices:
        raise ValueError(f"{name} strategy {getattr(self, name)!r}: choose one of {choices}")


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
  """A mesh, the four rule tables and the strategies. Immutable; build it with `make_plan`."""

  mesh: Mesh
  params: Rules
  grads: Rules
  opt_state: Rules
  activations: Rules
  strategies: Strategies = Strategies()

  def spec(self, axes: LogicalAxes, rules: Rules, shape: tuple[int, ...] | None = None) -> P:
    """Logical axes -> PartitionSpec; checks that each sharded dimension divides evenly. Inside a
    `shard_map` the axes it is manual over are left out: there the arrays are already per shard."""
    out, used, manual = [], set(), _manual_axes()
    for i, name in enumerate(axes):
      mesh_axes = rules.get(name) if name is not None else None
      if isinstance(mesh_axes, str):
        mesh_axes = (mesh_axes,)
      # Axes of size 1 shard nothing; leaving them out keeps specs readable.
      kept = tuple(a for a in (mesh_axes or ()) if self.mesh.shape[a] > 1 and a not in manual)
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
    """Pins an activation to the layout the activation table gives it (nothing on one device)."""
    return self._pin(x, axes, self.activations)

  def pin_to_params_layout(self, x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """Pins a weight to the layout the `params` table gives it: where the model computes with it."""
    return self._pin(x, axes, self.params)

  def _pin(self, x: jax.Array, axes: LogicalAxes, rules: Rules) -> jax.Array:
    if self.mesh.size == 1:
      return x
    spec = self.spec(axes, rules, x.shape)
    # Inside a shard_map that is manual over some axes (a pipeline's stages and batch shards), the
    # constraint is on the context's mesh, which knows those axes are manual; `spec` left them out.
    return jax.lax.with_sharding_constraint(x, spec if _manual_context() else NamedSharding(self.mesh, spec))

  @property
  def op_mesh(self):
    """The mesh an op's `shard_map` runs on: the plan's, or inside a partly manual `shard_map`
    (a pipeline stage) the context's abstract mesh."""
    return _manual_context() or self.mesh

  def activation_axes(self, name: str) -> tuple[str, ...]:
    """The mesh axes (size > 1) that the activation table splits dimension `name` over; () if none.
    Inside a `shard_map`, the axes it is manual over are left out (there `name` is per shard)."""
    axes = self.activations.get(name)
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    manual = _manual_axes()
    return tuple(a for a in axes if self.mesh.shape[a] > 1 and a not in manual)

  def manual_activation_axes(self, name: str) -> tuple[str, ...]:
    """The mesh axes (size > 1) of dimension `name` that a surrounding `shard_map` is manual over
    (a pipeline's batch shards): there an array holds one shard's part of `name`."""
    axes = self.activations.get(name)
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    manual = _manual_axes()
    return tuple(a for a in axes if self.mesh.shape[a] > 1 and a in manual)

  @property
  def data_parallel_size(self) -> int:
    """How many ways the batch's rows are split (the product of its mesh axes)."""
    return math.prod(self.mesh.shape[a] for a in self.activation_axes("batch"))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def batch_sharding(self) -> NamedSharding:
    """Where every [batch, length] input array of a batch lives."""
    return self.sharding(TOKEN_AXES, self.activations)


def make_plan(mesh: Mesh, *, zero_stage: int = 0, sequence_parallel: bool = False, vocab_parallel: bool = True,
              strategies: Strategies = Strategies(), expert_axes: tuple[str, ...] = ("expert",),
              expert_tensor_axes: tuple[str, ...] = ("tensor",)) -> ShardingPlan:
  """Megatron TP (+SP) and a ZeRO stage over whatever axes `mesh` has, plus the strategies. A
  pipeline puts the layer stack's `layers` dimension on `stage`, and with `pipeline_vocab` the
  weights' `vocab` dimension too (outside `tensor`): each stage stores the slice it scores.
  Routed experts go over `expert_axes`, each expert's width over `expert_tensor_axes` (folding)."""
  weights = {**tensor_rules(vocab_parallel), **expert_rules(expert_axes, expert_tensor_axes)}
  if strategies.pipeline != "none":
    weights = {**weights, "layers": "stage"}
  stored = weights
  if strategies.pipeline_vocab:
    stored = {**weights, "vocab": ("stage", *([weights["vocab"]] if weights["vocab"] else []))}
  params, grads, opt_state = zero_tables(stored, zero_stage)
  return ShardingPlan(mesh=mesh, params=params, grads=grads, opt_state=opt_state,
                      activations=activation_rules(weights, sequence_parallel), strategies=strategies)


def plan_from_config(config: Config, mesh: Mesh) -> ShardingPlan:
  """The run's plan: the one place that reads `config.sharding`."""
  s = config.sharding
  layout = "contiguous" if s.attention in ("dense", "ulysses") else s.context_layout
  strategies = Strategies(attention=s.attention, layout=layout, ulysses=s.ulysses_degree if s.attention == "usp" else 1,
                          pipeline=s.pipeline, virtual_stages=pipeline_chunks(config),
                          pipeline_vocab=s.pipeline_vocab_parallel, replica=s.replica,
                          expert_dispatch=s.expert_dispatch, capacity_factor=s.capacity_factor,
                          expert_all_to_all=s.expert_all_to_all, expert_chunks=s.expert_chunks,
                          grouped_matmul=s.grouped_matmul)
  return make_plan(mesh, zero_stage=s.zero_stage, sequence_parallel=s.sequence_parallel,
                   vocab_parallel=s.vocab_parallel, strategies=strategies,
                   expert_axes=tuple(s.expert_axes), expert_tensor_axes=tuple(s.expert_tensor_axes))


@functools.cache
def single_device_plan() -> ShardingPlan:
  """The plan of a plain dense model on one device: every table maps to axes of size 1."""
  return make_plan(single_device_mesh())
