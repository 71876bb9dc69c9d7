"""The train state as a pure pytree, its shardings, and its sharded initialisation.

state = {"params": nested dict of arrays, "opt_state": optax state, "step": int32 scalar}

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


def _params(config: Config) -> dict:
  return nnx.to_pure_dict(nnx.split(Transformer(config.model, rngs=nnx.Rngs(config.train.seed)))[1])


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
  graphdef, abstract_vars = nnx.split(abstract_model)
  axes = logical_axes(abstract_vars)
  abstract_params = nnx.to_pure_dict(abstract_vars)  # ShapeDtypeStructs
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


def init_state(setup: TrainSetup, params: Any = None) -> dict:
  """Parameters and a fresh optimizer state, created directly in their sharded layout.

  `params`: start from these (e.g. `training.checkpoint.restore_params`) instead of a random init.
  """
  def init(params):
    params = _params(setup.config) if params is None else params
    return {"params": params, "opt_state": setup.tx.init(params), "step": jnp.zeros((), jnp.int32)}

  if params is None:
    return jax.jit(lambda: init(None), out_shardings=setup.state_shardings)()
  return jax.jit(init, in_shardings=(setup.state_shardings["params"],), out_shardings=setup.state_shardings)(params)


def bytes_per_device(tree: Any) -> int:
  """Bytes that one device holds of a pytree of sharded arrays (device 0's shards)."""
  total = 0
  for x in jax.tree.leaves(tree):
    total += jnp.dtype(x.dtype).itemsize * math.prod(x.sharding.shard_shape(x.shape))
  return total
