"""The jitted train and eval steps: loss, microbatched gradients, the ZeRO-aware optimizer update."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from parallel.rules import ShardingPlan
from parallel.vocab_parallel import cross_entropy, vocab_parallel_cross_entropy
from training.optimizer import matrix_mask, learning_rate_schedule
from training.state import BATCH_AXES, TrainSetup

Batch = dict[str, jax.Array]


def token_losses(logits_BxLxV: jax.Array, targets_BxL: jax.Array, plan: ShardingPlan | None) -> jax.Array:
  """Per-token cross-entropy; vocabulary-parallel when the plan splits `vocab` over a mesh axis."""
  vocab_axes = plan.mesh_axes("vocab") if plan is not None else ()
  if not vocab_axes:
    return cross_entropy(logits_BxLxV, targets_BxL)
  (axis,) = vocab_axes
  return vocab_parallel_cross_entropy(logits_BxLxV, targets_BxL, mesh=plan.mesh, axis=axis,
                                      batch_axes=plan.mesh_axes("batch"))


def uses_segments(config) -> bool:
  """Whether attention is masked to documents: synthetic tokens have none, and users may opt out."""
  return config.data.mask_documents and config.data.source != "synthetic"


def loss_sum_and_count(graphdef, params, batch: Batch, plan: ShardingPlan | None, mask_documents: bool = True):
  """Sum of masked token losses and the number of counted tokens (float32 scalars)."""
  model = nnx.merge(graphdef, params)
  segments = batch["segment_ids"] if mask_documents else None
  logits = model(batch["inputs"], batch["positions"], segments, plan=plan)
  mask = batch["loss_mask"]
  return jnp.sum(token_losses(logits, batch["targets"], plan) * mask), jnp.sum(mask)


def _split_microbatches(batch: Batch, n: int, plan: ShardingPlan) -> Batch:
  """[B, L] -> [n, B/n, L], microbatch m = rows m, m+n, ... so each stays spread over all data shards."""
  def split(x):
    b = x.shape[0]
    x = x.reshape(b // n, n, *x.shape[1:]).swapaxes(0, 1)
    return plan.constrain(x, (None,) + BATCH_AXES)
  return jax.tree.map(split, batch)


def make_compute_params(setup: TrainSetup) -> Callable:
  """Master parameters -> the parameters the model computes with.

  Under mixed precision the weight matrices the model only multiplies by are cast to the compute
  dtype once, before differentiation, so their gradients come out in the compute dtype. They
  hold the same values the float32 gradients did (each is one bf16 matmul output, upcast), at
  half the bytes to stack across layers and to read in the update. The input embedding stays
  float32: its gradient is a scatter-add, which must accumulate in float32.

  Nothing is gathered here. Each layer's weights are all-gathered (in the compute dtype) where
  that layer uses them, and XLA overlaps those gathers with the layers before; gathering the
  whole tree up front would put every layer's weights on the first layer's critical path.
  """
  dtype = jnp.dtype(setup.config.model.compute_dtype)
  if dtype == jnp.dtype(setup.config.model.param_dtype):
    return lambda params: params
  cast = matrix_mask(setup.axes)
  cast["embed"] = False
  return lambda params: jax.tree.map(lambda x, c: x.astype(dtype) if c else x, params, cast)


def make_grad_fn(setup: TrainSetup) -> Callable:
  """(params, batch) -> (float32 mean-loss gradients in the grad layout, mean loss, token count)."""
  plan, graphdef = setup.plan, setup.graphdef
  n_micro = setup.config.data.microbatches
  masked, to_compute = uses_segments(setup.config), make_compute_params(setup)
  vg = jax.value_and_grad(lambda p, b: loss_sum_and_count(graphdef, p, b, plan, masked), has_aux=True)
  reduce = lambda g: jax.lax.with_sharding_constraint(g, setup.grad_shardings)

  def grad_fn(params, batch):
    compute = to_compute(params)  # gradients are taken with respect to these
    if n_micro == 1:
      (loss_sum, count), grads = vg(compute, batch)
      grads = reduce(grads)
    else:
      def body(acc, mb):
        (l, c), g = vg(compute, mb)
        g_acc, l_acc, c_acc = acc
        return (jax.tree.map(jnp.add, g_acc, reduce(g)), l_acc + l, c_acc + c), None
      zeros = reduce(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
      (grads, loss_sum, count), _ = jax.lax.scan(body, (zeros, 0.0, 0.0),
                                                 _split_microbatches(batch, n_micro, plan))
    # Normalise by tokens of the whole global batch, so layouts and accumulation agree exactly.
    # The upcast fuses into the gradient's consumers (norm, update); it is not stored.
    count = jnp.maximum(count, 1.0)
    return jax.tree.map(lambda g: g.astype(jnp.float32) / count, grads), loss_sum / count, count

  return grad_fn


def make_train_step(setup: TrainSetup) -> Callable:
  """Returns jitted `(state, batch) -> (state, metrics)`; the input state is donated."""
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

  return jax.jit(step, in_shardings=(setup.state_shardings, setup.batch_sharding),
                 out_shardings=(setup.state_shardings, setup.plan.replicated), donate_argnums=0)


def make_eval_step(setup: TrainSetup) -> Callable:
  """Returns jitted `(params, batch) -> (loss_sum, token_count)`."""
  masked, to_compute = uses_segments(setup.config), make_compute_params(setup)
  fn = lambda params, batch: loss_sum_and_count(setup.graphdef, to_compute(params), batch, setup.plan, masked)
  return jax.jit(fn, in_shardings=(setup.state_shardings["params"], setup.batch_sharding),
                 out_shardings=setup.plan.replicated)
