"""The gradient function: (params, batch[, router biases]) -> (mean-loss gradients, mean loss, token
count, expert statistics).

`plain` takes one value-and-grad of the whole batch; `microbatched` scans over microbatches and
accumulates gradients in the reduced (ZeRO-2: sharded) layout; `pipelined` hands forward and
backward to the plan's pipeline schedule (`training/pipelined.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from parallel.plan import TOKEN_AXES, ShardingPlan
from training.loss import Batch, loss_terms, merge_expert_stats, uses_segments
from training.optimizer import matrix_mask
from training.pipelined import make_pipelined_grad
from training.state import TrainSetup, with_router_bias

GradFn = Callable[..., tuple]


def split_microbatches(batch: Batch, n: int, plan: ShardingPlan) -> Batch:
  """[B, L] -> [n, B/n, L], microbatch m = rows m, m+n, ... so each stays spread over all data shards."""
  def split(x):
    b = x.shape[0]
    x = x.reshape(b // n, n, *x.shape[1:]).swapaxes(0, 1)
    return plan.constrain(x, (None,) + TOKEN_AXES)
  return jax.tree.map(split, batch)


def make_compute_params(setup: TrainSetup) -> Callable:
  """Master parameters -> the parameters the model computes with.

  Under mixed precision the weight matrices the model only multiplies by are cast to the compute
  dtype once, before differentiation, so their gradients come out in the compute dtype. They
  hold the same values the float32 gradients did (each is one bf16 matmul output, upcast), at
  half the bytes to stack across layers and to read in the update. The input embedding stays
  float32: its gradient is a scatter-add, which must accumulate in float32. So do the experts'
  routers: top-k selection is discontinuous in the scores, so they are computed in float32.

  Nothing is gathered here. Each layer's weights are all-gathered (in the compute dtype) where
  that layer uses them (`models.stack.gather_for_compute`), and XLA overlaps those gathers with
  the layers before; gathering the whole tree up front would put every layer's weights on the
  first layer's critical path.
  """
  dtype = jnp.dtype(setup.config.model.compute_dtype)
  if dtype == jnp.dtype(setup.config.model.param_dtype):
    return lambda params: params
  cast = matrix_mask(setup.axes)
  cast["embed"] = False
  cast = jax.tree_util.tree_map_with_path(lambda path, c: c and getattr(path[-1], "key", None) != "router", cast)
  return lambda params: jax.tree.map(lambda x, c: x.astype(dtype) if c else x, params, cast)


def make_grad_fn(setup: TrainSetup) -> GradFn:
  """(params, batch, router biases or None) -> (float32 mean-loss gradients in the grad layout, mean
  cross-entropy, token count, expert statistics: `models.moe.MOE_OUTPUTS` stacked per MoE layer, {}
  for dense models).

  The objective differentiated is the cross-entropy plus the weighted router losses (and, where the
  batch holds a teacher's logits, mixed with the distillation KL: `training.loss.loss_terms`, whose
  "distill_kl" sum joins the statistics)."""
  plan, graphdef = setup.plan, setup.graphdef
  n_micro = setup.config.data.microbatches
  masked, to_compute = uses_segments(setup.config), make_compute_params(setup)
  model_cfg = setup.config.model
  vg = jax.value_and_grad(lambda p, bias, b: loss_terms(graphdef, with_router_bias(p, bias), b, plan, masked,
                                                        model_cfg, setup.config.distill), has_aux=True)
  reduce = lambda g: jax.lax.with_sharding_constraint(g, setup.grad_shardings)

  def plain(compute, bias, batch):
    (_, (loss_sum, count, stats)), grads = vg(compute, bias, batch)
    return reduce(grads), loss_sum, count, stats

  def microbatched(compute, bias, batch):
    def body(acc, mb):
      (_, (l, c, s)), g = vg(compute, bias, mb)
      g_acc, l_acc, c_acc = acc
      return (jax.tree.map(jnp.add, g_acc, reduce(g)), l_acc + l, c_acc + c), s
    zeros = reduce(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), compute))
    (grads, loss_sum, count), stats = jax.lax.scan(body, (zeros, 0.0, 0.0),
                                                   split_microbatches(batch, n_micro, plan))
    return grads, loss_sum, count, merge_expert_stats(stats)

  pipeline = (make_pipelined_grad(setup, lambda batch: split_microbatches(batch, n_micro, plan))
              if plan.strategies.pipeline != "none" else None)

  def pipelined(compute, bias, batch):
    # Of the expert statistics only the load comes out of the executor; the router losses reach
    # the gradient, not the metrics.
    grads, loss_sum, count, stats = pipeline(compute, batch, bias)
    return reduce(grads), loss_sum, count, stats

  run = pipelined if pipeline else (plain if n_micro == 1 else microbatched)

  def grad_fn(params, batch, router_bias=None):
    # Gradients w.r.t. the compute params; the biases only select experts and get none.
    grads, loss_sum, count, stats = run(to_compute(params), router_bias, batch)
    # Normalise by tokens of the whole global batch, so layouts and accumulation agree exactly.
    # The upcast fuses into the gradient's consumers (norm, update); it is not stored.
    count = jnp.maximum(count, 1.0)
    return jax.tree.map(lambda g: g.astype(jnp.float32) / count, grads), loss_sum / count, count, stats

  return grad_fn
