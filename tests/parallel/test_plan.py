"""The plan: rule tables per ZeRO stage and tensor layout, the residual stream's layout under
Megatron sequence parallelism (and the collectives it compiles to), strategies, one device."""

import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

import configs
from parallel.mesh import make_mesh
from parallel.plan import Strategies, make_plan, plan_from_config, single_device_plan
from parallel.rules.megatron import activation_rules, tensor_rules


def test_zero_stages_shard_what_they_should():
  mesh = make_mesh({"fsdp": 4, "tensor": 2})
  w = ("embed", "mlp")
  specs = lambda plan: tuple(plan.spec(w, t) for t in (plan.params, plan.grads, plan.opt_state))
  assert specs(make_plan(mesh, zero_stage=0)) == (P(None, "tensor"),) * 3
  assert specs(make_plan(mesh, zero_stage=1)) == (P(None, "tensor"), P(None, "tensor"), P("fsdp", "tensor"))
  assert specs(make_plan(mesh, zero_stage=2)) == (P(None, "tensor"), P("fsdp", "tensor"), P("fsdp", "tensor"))
  assert specs(make_plan(mesh, zero_stage=3)) == (P("fsdp", "tensor"),) * 3
  with pytest.raises(ValueError, match="zero_stage=4"):
    make_plan(mesh, zero_stage=4)


def test_sequence_parallel_puts_the_residual_stream_on_tensor():
  mesh = make_mesh({"data": 2, "tensor": 4})
  residual = ("batch", "residual_length", "embed")
  assert make_plan(mesh, sequence_parallel=True).spec(residual, make_plan(mesh, sequence_parallel=True).activations) \
      == P("data", "tensor", None)
  assert make_plan(mesh).spec(residual, make_plan(mesh).activations) == P("data", None, None)
  # Attention and MLP activations keep the whole length and split heads.
  plan = make_plan(mesh, sequence_parallel=True)
  assert plan.spec(("batch", "length", "heads", "head_dim"), plan.activations) == P("data", None, "tensor", None)


def test_plan_from_config_reads_the_sharding_section():
  cfg = configs.get_config("tiny", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "sharding.zero_stage=2",
                                    "sharding.sequence_parallel=true", "sharding.vocab_parallel=false"])
  plan = plan_from_config(cfg, make_mesh(configs.validate(cfg, 8)))
  assert plan.strategies == Strategies(attention="dense", layout="contiguous", pipeline="none", replica="sync")
  assert plan.spec(("embed", "vocab"), plan.params) == P(None, None)  # vocab_parallel=false
  assert plan.spec(("embed", "mlp"), plan.grads) == P("fsdp", "tensor")
  assert plan.activation_axes("residual_length") == ("tensor",)
  assert plan.activation_axes("batch") == ("data", "fsdp")
  with pytest.raises(ValueError, match="attention strategy 'flash'"):
    Strategies(attention="flash")


def test_context_parallel_plan_splits_length_over_seq():
  cfg = configs.get_config("tiny", ["mesh.data=1", "mesh.seq=4", "mesh.tensor=2", "sharding.attention=usp",
                                    "sharding.ulysses_degree=2", "sharding.sequence_parallel=true"])
  plan = plan_from_config(cfg, make_mesh(configs.validate(cfg, 8)))
  assert plan.strategies.layout == "zigzag" and plan.strategies.ulysses == 2
  assert plan.batch_sharding.spec == P(None, "seq")
  assert plan.spec(("batch", "residual_length", "embed"), plan.activations) == P(None, ("seq", "tensor"), None)
  assert plan.spec(("batch", "length", "heads", "head_dim"), plan.activations) == P(None, "seq", "tensor", None)


def test_pipeline_plan_stores_layers_and_vocab_slices_on_stages():
  mesh = make_mesh({"stage": 2, "data": 2, "tensor": 2})
  plan = make_plan(mesh, zero_stage=3, strategies=Strategies(pipeline="1f1b", pipeline_vocab=True))
  assert plan.spec(("layers", "embed", "mlp"), plan.params) == P("stage", None, "tensor")
  assert plan.spec(("vocab", "embed"), plan.params) == P(("stage", "tensor"), None)
  # Logits inside a stage split only over tensor: the stage slice is the executor's business.
  assert plan.activation_axes("vocab") == ("tensor",)
  plain = make_plan(mesh, strategies=Strategies(pipeline="1f1b"))
  assert plain.spec(("vocab", "embed"), plain.params) == P("tensor", None)


def test_megatron_tables():
  """Column-parallel q/k/v and gate/up split their output (heads, mlp) over tensor; the vocabulary
  only when asked; activations put the batch on the data axes and, under SP, the residual stream's
  length on tensor too."""
  weights = tensor_rules()
  assert (weights["heads"], weights["kv_heads"], weights["mlp"], weights["vocab"]) == ("tensor",) * 4
  assert weights["embed"] is None and tensor_rules(vocab_parallel=False)["vocab"] is None
  acts = activation_rules(weights, sequence_parallel=True)
  assert acts["batch"] == ("replica", "data", "fsdp") and acts["residual_length"] == ("seq", "tensor")
  assert activation_rules(weights)["residual_length"] == "seq"


def test_single_device_plan_constrains_nothing():
  plan = single_device_plan()
  assert plan.mesh.size == 1 and plan.activation_axes("batch") == () and plan.activation_axes("vocab") == ()
  x = jnp.ones((2, 4, 8))
  assert plan.constrain(x, ("batch", "residual_length", "embed")) is x
  assert plan.batch_sharding.spec == P(None, None)
