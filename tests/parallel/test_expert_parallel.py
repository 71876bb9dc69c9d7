"""Expert parallelism on the 8-device CPU mesh through `dispatch.experts_mlp` and the plan: expert=8,
data=2 x expert=4, expert=4 x tensor=2 (expert-tensor parallelism), fsdp=2 x expert=2 x tensor=2
under ZeRO-3, a folded layout (experts over data x seq x expert), chunked overlap; capacity and
dropless (padded all-to-all). Forward and gradients against the per-token reference; bf16 too.

Capacity is per dispatch group (a device's chunk of tokens), so the reference counts capacity per
contiguous group of T / (devices that split the tokens x chunks) tokens.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from parallel.experts.dispatch import experts_mlp
from parallel.experts.expert_parallel import expert_parallel_experts
from parallel.experts.routing import route
from parallel.mesh import make_mesh
from parallel.plan import Strategies, make_plan
from tests.parallel import expert_cases as cases
from tests.reference import assert_close, check_against_reference

E, T = 8, 32

# name: (mesh sizes, expert axes, zero stage, token-splitting devices)
LAYOUTS = {
    "expert8": ({"expert": 8}, ("expert",), 0),
    "data2_expert4": ({"data": 2, "expert": 4}, ("expert",), 0),
    "expert4_tensor2": ({"expert": 4, "tensor": 2}, ("expert",), 0),
    "fsdp2_expert2_tensor2_zero3": ({"fsdp": 2, "expert": 2, "tensor": 2}, ("expert",), 3),
    "folded_data_seq_expert": ({"data": 2, "seq": 2, "expert": 2}, ("data", "seq", "expert"), 0),
}


def _plan(layout, dispatch, factor=1.0, chunks=1):
  sizes, expert_axes, zero = LAYOUTS[layout]
  mesh = make_mesh({"data": 1, **sizes})
  strategies = Strategies(expert_dispatch=dispatch, capacity_factor=factor, expert_all_to_all="padded",
                          expert_chunks=chunks, grouped_matmul="xla")
  return make_plan(mesh, zero_stage=zero, strategies=strategies, expert_axes=expert_axes)


def _groups(plan, chunks):
  axes = set(plan.activation_axes("batch") + plan.activation_axes("length") + plan.activation_axes("experts"))
  return math.prod(plan.mesh.shape[a] for a in axes) * chunks


def _check(layout, dispatch, top_k=2, factor=1.0, chunks=1, dtype=jnp.float32, seed=0):
  plan = _plan(layout, dispatch, factor, chunks)
  args = cases.make_inputs(t=T, e=E, seed=seed)
  chosen = cases.choose(*args[:2], top_k)
  kept = (cases.gshard_kept(chosen, E, factor, _groups(plan, chunks)) if dispatch == "capacity"
          else np.ones_like(chosen, bool))

  def op(x, router, w_gate, w_up, w_down):
    # The weights in their stored layout (ZeRO-3: `embed` over fsdp), as the model holds them.
    place = lambda w, axes: jax.lax.with_sharding_constraint(w, plan.sharding(axes, plan.params, w.shape))
    w_gate, w_up = (place(w, ("experts", "embed", "expert_mlp")) for w in (w_gate, w_up))
    w_down = place(w_down, ("experts", "expert_mlp", "embed"))
    routing = route(cases.logits(x, router), top_k=top_k, normalize=top_k > 1)
    y, stats = experts_mlp(x, routing, w_gate, w_up, w_down, plan, compute_dtype=dtype)
    return y, stats["dropped"]

  if dispatch == "capacity":
    assert (~kept).any()  # the case overflows
  ref = cases.reference(chosen, kept)
  # The dropped count is compared exactly through the reference's constant (no gradient either way).
  check_against_reference(op, lambda *a: (ref(*a), jnp.float32((~kept).sum())), args, dtype=dtype)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_dropless(layout):
  _check(layout, "dropless")


@pytest.mark.parametrize("layout, chunks", [("expert8", 1), ("folded_data_seq_expert", 1), ("data2_expert4", 2)])
def test_capacity_overflow(layout, chunks):
  _check(layout, "capacity", factor=0.75, chunks=chunks)


def test_dropless_chunks():
  _check("expert4_tensor2", "dropless", chunks=2)


def test_top1():
  _check("expert4_tensor2", "dropless", top_k=1, seed=2)


@pytest.mark.parametrize("layout", ["fsdp2_expert2_tensor2_zero3", "folded_data_seq_expert"])
def test_bf16(layout):
  _check(layout, "dropless", dtype=jnp.bfloat16, seed=1)


def test_rejects():
  mesh = make_mesh({"data": 2, "expert": 4})
  x, _, w_gate, w_up, w_down = (jnp.asarray(a) for a in cases.make_inputs(t=T, e=E))
  w, e = jnp.ones((T, 2)), jnp.zeros((T, 2), jnp.int32)
  call = lambda **kw: expert_parallel_experts(x, w, e, w_gate, w_up, w_down, mesh=mesh, **kw)
  with pytest.raises(ValueError, match="not axes of the mesh"):
    call(expert_axes=("experts",))
  with pytest.raises(ValueError, match="6 experts do not divide over the expert axes"):
    expert_parallel_experts(x, w, e % 6, w_gate[:6], w_up[:6], w_down[:6], mesh=mesh)
  with pytest.raises(ValueError, match="both expert and expert-tensor"):
    call(tensor_axes=("expert",))
  with pytest.raises(ValueError, match="must not split the tokens"):
    call(token_axes=("data",), tensor_axes=("data",))
  with pytest.raises(ValueError, match="3 chunks"):
    call(chunks=3)
  with pytest.raises(ValueError, match="ragged"):
    call(all_to_all="ragged")
  with pytest.raises(ValueError, match="capacity_factor=0"):
    call(dispatch="capacity", capacity_factor=0.0)


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
  """`jax.lax.ragged_all_to_all`'s contract written with all_gather (XLA:CPU has no ragged
  all-to-all): source j's rows [input_offsets_j[me], + send_sizes_j[me]) land in my output at
  output_offsets_j[me]. Only for checking the op's offsets and sizes on CPU."""
  del recv_sizes
  me, rows = jax.lax.axis_index(axis_name), operand.shape[0]
  everything = [jax.lax.all_gather(a, axis_name) for a in (operand, input_offsets, send_sizes, output_offsets)]
  ops, starts, sizes, targets = everything
  i = jnp.arange(rows)
  for j in range(ops.shape[0]):
    src = ops[j][jnp.clip(starts[j, me] + i, 0, rows - 1)]
    dst = jnp.where(i < sizes[j, me], targets[j, me] + i, output.shape[0])
    output = output.at[dst].set(src, mode="drop")
  return output


def test_ragged_offsets_with_emulated_collective(monkeypatch):
  """The ragged path's bookkeeping (sizes, offsets both ways, local sort) against the reference,
  with the collective emulated; the real one is compared with the padded path on GPUs below."""
  monkeypatch.setattr(jax.lax, "ragged_all_to_all", _emulated_ragged_all_to_all)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  plan = _plan("folded_data_seq_expert", "dropless")
  args = cases.make_inputs(t=T, e=E, seed=4)
  chosen = cases.choose(*args[:2], 2)

  def op(x, router, w_gate, w_up, w_down):
    routing = route(cases.logits(x, router), top_k=2)
    return expert_parallel_experts(
        x, routing.weights, routing.experts, w_gate, w_up, w_down, mesh=plan.mesh,
        token_axes=plan.activation_axes("batch") + plan.activation_axes("length"),
        expert_axes=plan.activation_axes("experts"), all_to_all="ragged", grouped_matmul="xla")[0]

  check_against_reference(op, cases.reference(chosen, np.ones_like(chosen, bool)), args)


@pytest.mark.skipif(jax.default_backend() == "cpu" or jax.device_count() < 2,
                    reason="ragged all-to-all: GPU/TPU, 2+ devices")
def test_ragged_equals_padded_on_gpu():
  """Inside one compiled value-and-grad (XLA's scheduler on, as in a train step), the ragged path
  equals the padded one: values and every gradient."""
  n = jax.device_count()
  mesh = make_mesh({"data": 1, "expert": n})
  args = cases.make_inputs(t=64 * n, e=2 * n, d=64, f=32, seed=5)

  def loss(kind, x, router, w_gate, w_up, w_down):
    routing = route(cases.logits(x, router), top_k=2)
    y, _ = expert_parallel_experts(x, routing.weights, routing.experts, w_gate, w_up, w_down, mesh=mesh,
                                   all_to_all=kind, grouped_matmul="xla")
    return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape)))

  step = lambda kind: jax.jit(jax.value_and_grad(lambda *a: loss(kind, *a), argnums=(0, 1, 2, 3, 4)))
  assert_close(step("ragged")(*args), step("padded")(*args), what="ragged vs padded")


@pytest.mark.parametrize("sizes, expert_axes", [({"data": 4}, ("data",)),
                                                 ({"data": 2, "expert": 2}, ("data", "expert"))])
def test_inside_a_stage_manual_over_data(sizes, expert_axes):
  """As a pipeline stage calls it: inside a shard_map already manual over `stage` and `data` (the
  executor's check_vma=False), with the shard's rows and whole expert weights; experts over data
  (x expert)."""
  mesh = make_mesh({"stage": 2, **sizes})
  plan = make_plan(mesh, strategies=Strategies(expert_all_to_all="padded", grouped_matmul="xla"),
                   expert_axes=expert_axes)
  args = cases.make_inputs(t=T, e=E, seed=6)
  chosen = cases.choose(*args[:2], 2)

  def stage(x, router, w_gate, w_up, w_down):
    routing = route(cases.logits(x, router), top_k=2)
    return experts_mlp(x, routing, w_gate, w_up, w_down, plan)[0]

  whole = P()
  op = jax.shard_map(stage, mesh=mesh, axis_names=frozenset({"stage", "data"}),
                     in_specs=(P("data"), whole, whole, whole, whole), out_specs=P("data"), check_vma=False)
  check_against_reference(op, cases.reference(chosen, np.ones_like(chosen, bool)), args)


def test_tiled_expert_parallel():
  """The tiled FFN behind the padded all-to-all: received padding rows sort last and stay zero."""
  plan = make_plan(make_mesh({"data": 2, "expert": 2, "tensor": 2}),
                   strategies=Strategies(expert_all_to_all="padded", grouped_matmul="tiled"))
  args = cases.make_inputs(t=T, e=E, seed=9)
  chosen = cases.choose(*args[:2], 2)

  def op(x, router, w_gate, w_up, w_down):
    return experts_mlp(x, route(cases.logits(x, router), top_k=2), w_gate, w_up, w_down, plan)[0]

  check_against_reference(op, cases.reference(chosen, np.ones_like(chosen, bool)), args)


def test_rounds_expert_parallel():
  """The rounds FFN behind the padded all-to-all (data=2 x expert=4): padding rows sort last and
  stay zero; every token picks expert 0, so its device's group (32 rows against 8 slots per
  expert, from its 4 tokens x top-2) spills into three more rounds."""
  plan = make_plan(make_mesh({"data": 2, "expert": 4}),
                   strategies=Strategies(expert_all_to_all="padded", grouped_matmul="rounds"))
  args = cases.make_inputs(t=T, e=E, seed=10)
  chosen = cases.choose_skewed(*args[:2], 2)
  bias = jnp.zeros((E,)).at[0].set(100.0)

  def op(x, router, w_gate, w_up, w_down):
    routing = route(cases.logits(x, router), top_k=2, bias_E=bias)
    return experts_mlp(x, routing, w_gate, w_up, w_down, plan)[0]

  check_against_reference(op, cases.reference(chosen, np.ones_like(chosen, bool)), args)
