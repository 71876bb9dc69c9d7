"""The train step as a pure function, its jitted form, and the eval step.

`make_train_step_fn(setup)` is the un-jitted `(state, batch) -> (state, metrics)`: gradients from
`training.grad`, then the ZeRO-aware AdamW update. Outer optimizers (the low-communication family)
run several inner steps of exactly this function; `make_train_step` jits it with the plan's
shardings and donates the input state.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from parallel.experts.losses import update_bias
from training.grad import make_compute_params, make_grad_fn
from training.loss import loss_sum_and_count, router_loss, uses_segments
from training.optimizer import learning_rate_schedule
from training.state import TrainSetup, with_router_bias

StepFn = Callable[[dict, dict], tuple[dict, dict]]


def make_train_step_fn(setup: TrainSetup) -> StepFn:
  """The pure step: state {"params", "opt_state", "step"} and a batch -> (new state, metrics).

  Metrics: `loss` (mean cross-entropy over counted tokens), `grad_norm` (before clipping), `lr`
  (the rate this update used) and `tokens` (counted tokens), all float32 scalars; with experts
  also `moe_metrics`'s; with a batch that holds a teacher's logits (`training.distill`) also
  `distill_kl` (mean KL from the teacher per counted token).

  With experts the state's router biases are updated after the step from its observed load
  (DeepSeek-V3's auxiliary-loss-free balancing, model.bias_update_rate), outside the optimizer.
  """
  grad_fn = make_grad_fn(setup)
  model_cfg = setup.config.model
  schedule = learning_rate_schedule(setup.config.optimizer, setup.config.train.steps)
  to_opt = lambda t: jax.lax.with_sharding_constraint(t, setup.opt_param_shardings)

  def step(state, batch):
    grads, loss, count, stats = grad_fn(state["params"], batch, state.get("router_bias"))
    kl_sum = stats.pop("distill_kl", None)
    # ZeRO-1/2: each device updates only its slice of parameters and moments, then the new
    # parameters are all-gathered into their own layout by the output sharding.
    params, grads = to_opt(state["params"]), to_opt(grads)
    updates, opt_state = setup.tx.update(grads, state["opt_state"], params)
    new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                 "step": state["step"] + 1}
    # The norm of the sliced gradients: then the full gradients' only consumer is the slice, and
    # XLA can turn ZeRO-1's all-reduce + slice into a reduce-scatter.
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"]),
               "tokens": count}
    if kl_sum is not None:
      metrics["distill_kl"] = kl_sum / count
    if "router_bias" in state:
      new_state["router_bias"] = updated_router_bias(state["router_bias"], stats, model_cfg.bias_update_rate)
    if stats:
      metrics.update(moe_metrics(model_cfg, stats))
    return new_state, metrics

  return step


def updated_router_bias(router_bias: dict, stats: dict, rate: float) -> dict:
  """Each MoE layer's bias [E] moved by `rate` towards balance from the step's load [n_moe, E]
  (`parallel.experts.losses.update_bias`); unchanged when rate is 0."""
  if rate == 0:
    return router_bias
  load = stats["tokens_per_expert"]
  bias = router_bias["moe_layers"]["mlp"]["router_bias"]  # [n_moe, E], `models.moe.MoE.router_bias`
  new = jax.vmap(update_bias, in_axes=(0, 0, None))(bias, load, rate)
  return {"moe_layers": {"mlp": {"router_bias": new}}}


def moe_metrics(model_cfg, stats: dict) -> dict:
  """Logged per step: the router losses (mean per MoE layer) and their weighted sum added to the
  objective, the load imbalance (max / mean tokens per expert; the mean and the worst over MoE
  layers) and the fraction of token-expert pairs dropped by capacity. (A pipeline gives the load
  only: its metrics are the imbalance.)"""
  load = stats["tokens_per_expert"]  # [n_moe, E]
  imbalance = jnp.max(load, axis=-1) / jnp.maximum(jnp.mean(load, axis=-1), 1e-9)
  out = {"load_imbalance": jnp.mean(imbalance), "load_imbalance_max": jnp.max(imbalance)}
  if "aux_loss" in stats:
    out.update({"router_loss": router_loss(model_cfg, stats), "aux_loss": jnp.mean(stats["aux_loss"]),
                "seq_aux_loss": jnp.mean(stats["seq_aux_loss"]), "z_loss": jnp.mean(stats["z_loss"]),
                "dropped_fraction": jnp.sum(stats["dropped"]) / jnp.maximum(jnp.sum(load), 1.0)})
  return out


def make_train_step(setup: TrainSetup) -> StepFn:
  """`make_train_step_fn`, jitted with the plan's shardings; the input state is donated.

  The batch must be laid out as `setup.batch_sharding` (see `training.loop.to_global_batch`).
  """
  return jax.jit(make_train_step_fn(setup), in_shardings=(setup.state_shardings, setup.batch_sharding),
                 out_shardings=(setup.state_shardings, setup.plan.replicated), donate_argnums=0)


def make_eval_step(setup: TrainSetup) -> Callable:
  """Returns jitted `(params, batch, router_bias=None) -> (loss_sum, token_count)`; a model with
  experts needs the state's `router_bias` (it decides which experts each token uses)."""
  masked, to_compute = uses_segments(setup.config), make_compute_params(setup)

  def fn(params, batch, router_bias):
    variables = with_router_bias(to_compute(params), router_bias)
    return loss_sum_and_count(setup.graphdef, variables, batch, setup.plan, masked)

  step = jax.jit(fn, in_shardings=(setup.state_shardings["params"], setup.batch_sharding,
                                   setup.state_shardings.get("router_bias")),
                 out_shardings=setup.plan.replicated)
  return lambda params, batch, router_bias=None: step(params, batch, router_bias)
