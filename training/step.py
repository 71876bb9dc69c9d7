"""The train step as a pure function, its jitted form, and the eval step.

`make_train_step_fn(setup)` is the un-jitted `(state, batch) -> (state, metrics)`: gradients from
`training.grad`, then the ZeRO-aware AdamW update. Outer optimizers (the low-communication family)
run several inner steps of exactly this function; `make_train_step` jits it with the plan's
shardings and donates the input state.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

from training.grad import make_compute_params, make_grad_fn
from training.loss import loss_sum_and_count, uses_segments
from training.optimizer import learning_rate_schedule
from training.state import TrainSetup

StepFn = Callable[[dict, dict], tuple[dict, dict]]


def make_train_step_fn(setup: TrainSetup) -> StepFn:
  """The pure step: state {"params", "opt_state", "step"} and a batch -> (new state, metrics).

  Metrics: `loss` (mean over counted tokens), `grad_norm` (before clipping), `lr` (the rate this
  update used) and `tokens` (counted tokens), all float32 scalars.
  """
  grad_fn = make_grad_fn(setup)
  schedule = learning_rate_schedule(setup.config.optimizer, setup.config.train.steps)
  to_opt = lambda t: jax.lax.with_sharding_constraint(t, setup.opt_param_shardings)

  def step(state, batch):
    grads, loss, count = grad_fn(state["params"], batch)
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
    return new_state, metrics

  return step


def make_train_step(setup: TrainSetup) -> StepFn:
  """`make_train_step_fn`, jitted with the plan's shardings; the input state is donated.

  The batch must be laid out as `setup.batch_sharding` (see `training.loop.to_global_batch`).
  """
  return jax.jit(make_train_step_fn(setup), in_shardings=(setup.state_shardings, setup.batch_sharding),
                 out_shardings=(setup.state_shardings, setup.plan.replicated), donate_argnums=0)


def make_eval_step(setup: TrainSetup) -> Callable:
  """Returns jitted `(params, batch) -> (loss_sum, token_count)`."""
  masked, to_compute = uses_segments(setup.config), make_compute_params(setup)
  fn = lambda params, batch: loss_sum_and_count(setup.graphdef, to_compute(params), batch, setup.plan, masked)
  return jax.jit(fn, in_shardings=(setup.state_shardings["params"], setup.batch_sharding),
                 out_shardings=setup.plan.replicated)
