"""The train state as a pure pytree, its shardings, and its sharded initialisation.

state = {"params": nested dict of arrays, "opt_state": optax state, "step": int32 scalar}
and, for a model with mixture-of-experts layers, "router_bias": the auxiliary-loss-free balancing
biases (`models.moe.RouterBias`) at their places in the model's tree, outside "params": the
optimizer never sees them; the train step updates them from each step's expert load.

Crossing jit boundaries with pure pytrees (not stateful NNX objects) keeps donation, explicit
shardings and Orbax straightforward; the model is rebuilt inside the step with `nnx.merge`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from configs import Config, validate
from models.moe import RouterBias
from models.transformer import Transformer, logical_axes
from parallel.mesh import make_mesh
from parallel.plan import ShardingPlan, plan_from_config
from training.optimizer import make_optimizer


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """Everything static about a run: model structure, optimizer, shardings."""

  config: Config
  plan: ShardingPlan
  graphdef: Any
  axes: Any  # logical axes of every parameter, shaped like params
  tx: optax.GradientTransformation
  abstract_state: Any  # ShapeDtypeStructs carrying their shardings
  state_shardings: Any
  grad_shardings: Any
  opt_param_shardings: Any  # where the optimizer sees each parameter (ZeRO-1 and up: sharded)
  batch_sharding: Any  # every [batch, length] input array

  @property
  def n_params(self) -> int:
    return sum(x.size for x in jax.tree.leaves(self.abstract_state["params"]))


def _variables(model: Transformer) -> tuple[dict, dict]:
  """(parameters, router biases) of a model as pure dicts; the biases are {} for a dense model."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param)), nnx.to_pure_dict(nnx.state(model, RouterBias))


def _params(config: Config) -> tuple[dict, dict]:
  return _variables(Transformer(config.model, rngs=nnx.Rngs(config.train.seed)))


def has_router_bias(config: Config) -> bool:
  return config.model.n_experts > 0


def with_router_bias(params: Any, router_bias: Any) -> Any:
  """The model's whole variable tree (what `nnx.merge(setup.graphdef, ...)` takes): the
  parameters with the router biases put at their places. Dense models: `params` unchanged."""
  if not router_bias:
    return params
  out = dict(params)
  for key, value in router_bias.items():
    out[key] = with_router_bias(params[key], value) if isinstance(value, dict) else value
  return out


def sharded_masters(config: Config, plan: ShardingPlan) -> bool:
  """Mixed-precision ZeRO-1/2 (the plan shards optimizer state but not parameters): the float32
  master weights count as optimizer state (as in the ZeRO paper) and live sharded beside Adam's
  moments. The forward pass all-gathers each layer's weights in the compute dtype where it uses
  them (`models.stack.gather_for_compute`), so no float32 all-gather of the updated parameters
  follows the update."""
  return config.model.compute_dtype != config.model.param_dtype and plan.opt_state != plan.params


def build_setup(config: Config, plan: ShardingPlan) -> TrainSetup:
  """The abstract state of `config`'s model and optimizer, laid out by `plan` (nothing is run)."""
  abstract_model = nnx.eval_shape(lambda: Transformer(config.model, rngs=nnx.Rngs(config.train.seed)))
  graphdef, _ = nnx.split(abstract_model)
  axes = logical_axes(nnx.state(abstract_model, nnx.Param))
  abstract_params, abstract_bias = _variables(abstract_model)  # ShapeDtypeStructs
  tx = make_optimizer(config.optimizer, config.train.steps, axes)

  param_sh = plan.tree_shardings(axes, abstract_params, plan.params)
  grad_sh = plan.tree_shardings(axes, abstract_params, plan.grads)
  opt_param_sh = plan.tree_shardings(axes, abstract_params, plan.opt_state)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, abstract_opt, opt_param_sh,
                                 transform_non_params=lambda _: plan.replicated)
  master_sh = opt_param_sh if sharded_masters(config, plan) else param_sh
  state_sh = {"params": master_sh, "opt_state": opt_sh, "step": plan.replicated}
  abstract = {"params": abstract_params, "opt_state": abstract_opt,
              "step": jax.ShapeDtypeStruct((), jnp.int32)}
  if has_router_bias(config):  # a few floats per layer: replicated
    state_sh["router_bias"] = jax.tree.map(lambda _: plan.replicated, abstract_bias)
    abstract["router_bias"] = abstract_bias
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_sh)
  return TrainSetup(config, plan, graphdef, axes, tx, abstract, state_sh, grad_sh, opt_param_sh,
                    plan.batch_sharding)


def setup_from_config(config: Config, devices: list[jax.Device] | None = None) -> TrainSetup:
  """Validates `config` against the devices (default: all), then builds mesh, plan and setup.

  The one place a run turns its config into a plan; validation runs here, once per start.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = validate(config, len(devices), devices[0].platform)
  mesh = make_mesh(sizes, devices, outer_axes_across_hosts=config.mesh.outer_axes_across_hosts)
  return build_setup(config, plan_from_config(config, mesh))


def split_router_bias(variables: Any, router_bias: Any) -> tuple[Any, Any]:
  """A model's whole variable tree (`models.hf_moe.load_hf` gives one) -> (parameters, the router
  biases at the paths of `router_bias`, or None where it holds none)."""
  if not router_bias:
    return variables, None
  params, found = dict(variables), {}
  for key, sub in router_bias.items():
    if isinstance(sub, dict):
      params[key], inner = split_router_bias(variables[key], sub)
      if inner is not None:
        found[key] = inner
    elif key in params:
      found[key] = params.pop(key)
  return params, (found or None)


def init_state(setup: TrainSetup, params: Any = None) -> dict:
  """Parameters and a fresh optimizer state, created directly in their sharded layout.

  `params`: start from these (e.g. `training.checkpoint.restore_params`) instead of a random init;
  with experts they may hold router biases too (a model's whole variable tree), which then start
  the state's `router_bias` (else it starts at zero).
  """
  given_bias = None
  if params is not None and has_router_bias(setup.config):
    params, given_bias = split_router_bias(params, setup.abstract_state["router_bias"])

  def init(params, given_bias):
    fresh, router_bias = _params(setup.config)
    params = fresh if params is None else params
    state = {"params": params, "opt_state": setup.tx.init(params), "step": jnp.zeros((), jnp.int32)}
    if has_router_bias(setup.config):
      # Zeros (no balancing correction yet) unless given.
      state["router_bias"] = router_bias if given_bias is None else given_bias
    return state

  if params is None:
    return jax.jit(lambda: init(None, None), out_shardings=setup.state_shardings)()
  bias_sh = None if given_bias is None else setup.state_shardings["router_bias"]
  return jax.jit(init, in_shardings=(setup.state_shardings["params"], bias_sh),
                 out_shardings=setup.state_shardings)(params, given_bias)


def bytes_per_device(tree: Any) -> int:
  """Bytes that one device holds of a pytree of sharded arrays (device 0's shards)."""
  total = 0
  for x in jax.tree.leaves(tree):
    total += jnp.dtype(x.dtype).itemsize * math.prod(x.sharding.shard_shape(x.shape))
  return total
