"""The single-device dispatches (capacity and dropless) through `dispatch.experts_mlp`, forward and
gradients (inputs, router, expert weights) against the per-token reference of expert_cases.py:
ties in router scores, capacity overflow, an expert that receives no token, top-1, bf16."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import get_config
from parallel.experts.capacity import capacity_experts
from parallel.experts.dispatch import experts_mlp
from parallel.experts.dropless import dropless_experts
from parallel.experts.grouped_matmul import tokamax_available
from parallel.experts.mgpu_matmul import on_hopper
from parallel.experts.routing import route
from parallel.mesh import make_mesh, single_device_mesh
from parallel.plan import Strategies, make_plan, plan_from_config
from tests.parallel import expert_cases as cases
from tests.reference import check_against_reference

E, EMPTY = 8, 6


def _plan(dispatch, factor=1.25):
  return make_plan(single_device_mesh(), strategies=Strategies(expert_dispatch=dispatch, capacity_factor=factor,
                                                               grouped_matmul="xla"))


def _op(plan, top_k, compute_dtype=None):
  bias = jnp.zeros((E,)).at[EMPTY].set(-100.0)  # selection only: expert EMPTY gets no token

  def op(x, router, w_gate, w_up, w_down):
    routing = route(cases.logits(x, router), top_k=top_k, bias_E=bias, normalize=top_k > 1)
    return experts_mlp(x, routing, w_gate, w_up, w_down, plan, compute_dtype=compute_dtype)
  return op


# (dispatch, top_k, capacity factor): capacity 0.5 overflows, 4.0 keeps every pair.
CASES = [("dropless", 2, 1.0), ("dropless", 1, 1.0), ("capacity", 2, 0.5), ("capacity", 1, 0.75), ("capacity", 2, 4.0)]


@pytest.mark.parametrize("dispatch, top_k, factor", CASES)
def test_single_device_against_per_token_reference(dispatch, top_k, factor):
  args = cases.make_inputs()
  lg = np.asarray(jax.jit(cases.logits)(*args[:2]))
  assert (lg[:, 1] == lg[:, 3]).all()  # the tie the case is about
  chosen = cases.choose(*args[:2], top_k, empty_expert=EMPTY)
  kept = cases.gshard_kept(chosen, E, factor, 1) if dispatch == "capacity" else np.ones_like(chosen, bool)
  if (dispatch, factor) == ("capacity", 0.5):
    assert not kept.all()
  op = _op(_plan(dispatch, factor), top_k)
  y, stats = jax.jit(op)(*args)
  np.testing.assert_array_equal(np.asarray(stats["tokens_per_expert"]), np.bincount(chosen.reshape(-1), minlength=E))
  assert float(stats["dropped"]) == (~kept).sum()
  np.testing.assert_allclose(np.asarray(y), cases.loop_reference(*args, chosen, kept), rtol=1e-5, atol=1e-6)
  check_against_reference(lambda *a: op(*a)[0], cases.reference(chosen, kept), args)


def test_reference_equals_token_loop():
  args = cases.make_inputs(seed=3)
  chosen = cases.choose(*args[:2], 2)
  kept = cases.gshard_kept(chosen, E, 0.5, 2)
  np.testing.assert_allclose(np.asarray(jax.jit(cases.reference(chosen, kept))(*args)),
                             cases.loop_reference(*args, chosen, kept), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_bf16(dispatch):
  args = cases.make_inputs(seed=1)
  chosen = cases.choose(*args[:2], 2, empty_expert=EMPTY)
  kept = cases.gshard_kept(chosen, E, 1.0, 1) if dispatch == "capacity" else np.ones_like(chosen, bool)
  op = _op(_plan(dispatch, 1.0), 2, compute_dtype=jnp.bfloat16)
  assert jax.jit(op)(*args)[0].dtype == jnp.bfloat16
  check_against_reference(lambda *a: op(*a)[0], cases.reference(chosen, kept), args, dtype=jnp.bfloat16)


def test_capacity_formula():
  from parallel.experts.capacity import capacity
  assert capacity(16, 2, 8, 1.25) == math.ceil(1.25 * 16 * 2 / 8) == 5
  assert capacity(3, 1, 8, 0.1) == 1


@pytest.mark.parametrize("fn", [capacity_experts, dropless_experts])
def test_ops_reject_bad_inputs(fn):
  x, _, w_gate, w_up, w_down = (jnp.asarray(a) for a in cases.make_inputs())
  w, e = jnp.ones((16, 2)), jnp.zeros((16, 2), jnp.int32)
  kw = {"capacity_factor": 1.0} if fn is capacity_experts else {}
  with pytest.raises(ValueError, match="must both be"):
    fn(x, w[:3], e, w_gate, w_up, w_down, **kw)
  with pytest.raises(ValueError, match="w_down"):
    fn(x, w, e, w_gate, w_up, w_down[:, :3], **kw)
  with pytest.raises(ValueError, match="integers"):
    fn(x, w, w, w_gate, w_up, w_down, **kw)
  with pytest.raises(ValueError, match="above the 8 experts"):
    fn(x, jnp.ones((16, 9)), jnp.zeros((16, 9), jnp.int32), w_gate, w_up, w_down, **kw)
  if fn is capacity_experts:
    with pytest.raises(ValueError, match="capacity_factor=0"):
      fn(x, w, e, w_gate, w_up, w_down, capacity_factor=0)


@pytest.mark.parametrize("impl", [
    pytest.param("tokamax", marks=pytest.mark.skipif(jax.default_backend() != "gpu" or not tokamax_available(),
                                                     reason="tokamax: a GPU with tokamax")),
    pytest.param("mgpu", marks=pytest.mark.skipif(not on_hopper(), reason="mgpu: a Hopper GPU")),
])
def test_gpu_grouped_matmul_bf16(impl):
  """The GPU grouped-matmul kernels through the dropless dispatch, against the per-token reference
  in bf16 (widths multiples of the mgpu kernels' 128-wide tiles). Run on a GPU with
  JAX_PLATFORMS=cuda (the suite's conftest defaults to the CPU)."""
  plan = make_plan(single_device_mesh(), strategies=Strategies(grouped_matmul=impl))
  args = cases.make_inputs(t=256, d=128, f=128, seed=7)
  chosen = cases.choose(*args[:2], 2, empty_expert=EMPTY)
  op = _op(plan, 2, compute_dtype=jnp.bfloat16)
  check_against_reference(lambda *a: op(*a)[0], cases.reference(chosen, np.ones_like(chosen, bool)), args,
                          dtype=jnp.bfloat16)


def test_plan_from_config_carries_the_expert_choices():
  config = get_config("tiny_moe", ["mesh.data=2", "mesh.seq=2", "mesh.expert=2", "sharding.attention=ring",
                                   "sharding.expert_axes=data,seq,expert", "sharding.expert_tensor_axes=",
                                   "sharding.expert_dispatch=capacity", "sharding.capacity_factor=2.0",
                                   "sharding.expert_chunks=2", "sharding.zero_stage=3"])
  plan = plan_from_config(config, make_mesh({"data": 2, "seq": 2, "expert": 2}))
  s = plan.strategies
  assert (s.expert_dispatch, s.capacity_factor, s.expert_chunks) == ("capacity", 2.0, 2)
  assert plan.activation_axes("experts") == ("data", "seq", "expert")
  assert plan.params["expert_mlp"] is None and plan.activation_axes("expert_mlp") == ()
  # Parameters: experts over data x seq x expert, the embed dimension over fsdp (size 1 here).
  want = P(("data", "seq", "expert"), None, None)
  assert plan.spec(("experts", "embed", "expert_mlp"), plan.params, (8, 64, 32)) == want


@pytest.mark.parametrize("top_k, dtype", [(2, jnp.float32), (1, jnp.float32), (2, jnp.bfloat16)])
def test_tiled_ffn(top_k, dtype):
  """Dropless through expert-aligned tiles (an empty expert, ties, groups of every size)."""
  plan = make_plan(single_device_mesh(), strategies=Strategies(grouped_matmul="tiled"))
  args = cases.make_inputs(t=40, seed=8)
  chosen = cases.choose(*args[:2], top_k, empty_expert=EMPTY)
  op = _op(plan, top_k, compute_dtype=dtype)
  check_against_reference(lambda *a: op(*a)[0], cases.reference(chosen, np.ones_like(chosen, bool)), args, dtype=dtype)


@pytest.mark.parametrize("top_k, dtype, skew", [(2, jnp.float32, False), (1, jnp.float32, False),
                                                (2, jnp.float32, True), (2, jnp.bfloat16, True)])
def test_rounds_ffn(top_k, dtype, skew):
  """Dropless through [E, C, D] slots in rounds: ties, an empty expert, and (skew) expert 0 chosen
  by every token, so its group needs round 0 and several spill rounds."""
  plan = make_plan(single_device_mesh(), strategies=Strategies(grouped_matmul="rounds"))
  args = cases.make_inputs(t=40, seed=8)
  bias = jnp.zeros((E,)).at[EMPTY].set(-100.0)
  if skew:
    bias = bias.at[0].set(100.0)
  chosen = (cases.choose_skewed if skew else cases.choose)(*args[:2], top_k, empty_expert=EMPTY)
  sizes = np.bincount(chosen.reshape(-1), minlength=E)
  assert sizes[EMPTY] == 0
  if skew:  # 40 rows for expert 0 against round 0's 16 slots and spill rounds of 8
    assert sizes[0] == 40

  def op(x, router, w_gate, w_up, w_down):
    routing = route(cases.logits(x, router), top_k=top_k, bias_E=bias, normalize=top_k > 1)
    return experts_mlp(x, routing, w_gate, w_up, w_down, plan, compute_dtype=dtype)[0]

  check_against_reference(op, cases.reference(chosen, np.ones_like(chosen, bool)), args, dtype=dtype)


def test_round_capacities():
  """Slots: the mean group x factor rounded up (128 on GPU-sized groups, 8 on small ones)."""
  from parallel.experts.rounds import round_capacities
  assert round_capacities(65536, 16) == (4096, 1024)
  assert round_capacities(65536, 16, 1.1) == (4608, 1152)
  assert round_capacities(80, 8) == (16, 8)
  with pytest.raises(ValueError, match="factor=0"):
    round_capacities(80, 8, 0)


@pytest.mark.parametrize("group_sizes", [
    # 88 of 96 rows used; with 8 slots per expert in every round, expert 1's 52 extra rows and
    # experts 3-5's one each make 10 spill chunks: two spill rounds, expert 1's chunks across both.
    [0, 60, 0, 9, 9, 9, 0, 1],
    # Every group within round 0's 8 slots: no spill round.
    [8, 8, 7, 0, 8, 8, 8, 1]])
def test_rounds_padding_rows(group_sizes):
  """Rows past the groups (expert-parallel padding) come out zero and get no gradient."""
  from parallel.experts.ffn import batched_ffn
  from parallel.experts.rounds import rounds_ffn
  args = cases.make_inputs(t=96)
  args = (args[0], *args[2:])
  bounds = np.cumsum([0, *group_sizes])
  sizes = jnp.asarray(np.diff(bounds), jnp.int32)
  op = lambda x, *w: rounds_ffn(x, sizes, *w, batched_ffn, expected_rows=8)

  def ref(x, w_gate, w_up, w_down):  # per group, in float32 at highest precision; padding rows zero
    hp = "highest"
    outs = [jnp.dot(jax.nn.silu(jnp.dot(x[lo:hi], w_gate[e], precision=hp)) * jnp.dot(x[lo:hi], w_up[e], precision=hp),
                    w_down[e], precision=hp) for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))]
    return jnp.concatenate(outs + [jnp.zeros((x.shape[0] - bounds[-1], x.shape[1]))])

  check_against_reference(op, ref, args)
  out, vjp = jax.vjp(op, *(jnp.asarray(a) for a in args))
  used = bounds[-1]
  np.testing.assert_array_equal(np.asarray(out[used:]), 0)
  assert not np.asarray(vjp(jnp.ones_like(out))[0][used:]).any()


def test_auto_picks_rounds_on_gpus():
  from parallel.experts.grouped_matmul import grouped_matmul, resolve
  assert (resolve("auto", "gpu", hopper=False), resolve("auto", "cpu"), resolve("tokamax", "gpu")) == \
      ("rounds", "xla", "tokamax")
  hopper = dict(backend="gpu", hopper=True, widths=(2048, 1408), dtype=jnp.bfloat16)
  assert resolve("auto", **hopper, one_device=True) == "mgpu"
  assert resolve("auto", **hopper, one_device=False) == "rounds"  # padded expert-parallel buffers
  assert resolve("auto", **{**hopper, "widths": (2048, 1400)}, one_device=True) == "rounds"
  assert resolve("auto", **{**hopper, "dtype": jnp.float32}, one_device=True) == "rounds"
  with pytest.raises(ValueError, match="rounds implementation runs whole FFNs"):
    grouped_matmul(jnp.ones((4, 8)), jnp.ones((2, 8, 3)), jnp.array([2, 2]), "rounds")
