"""The pipelined gradient function: the model's three pieces handed to the pipeline executor.

The embedding runs on the first part's stage, the layer stack in `stages x chunks` parts (slices
of the stacked layers, placed as the schedule says), the head and loss on the last part's stage.
The batch is cut into `data.microbatches` microbatches, each spread over the data shards; the
executor is manual over the batch axes as over `stage`, so each batch shard pipelines its own
rows. Weight gradients accumulate inside the executor and are summed over the batch axes once per
step, after the last tick; a ZeRO-3 (`fsdp`) shard of a stage's weights is gathered once per step,
on entry, not per microbatch.

With `sharding.pipeline_vocab_parallel` the embedding and the head are split on the vocabulary over
all stages instead (`parallel/pipeline/vocab.py`): the head piece hands the executor its slice of
the logits and the executor computes the loss and its gradient across stages.

A model with experts pipelines its MoE stack (every layer sparse): each part adds its layers'
weighted router losses, per counted token of the microbatch, to the objective through the gradient
(`training.loss.add_loss_gradient`). The router biases ride along with the parts' weights; they
select experts only, so their true gradient is zero, and each part adds sum(stop_gradient(load) x
bias) to the objective instead: the executor's "gradient" of the biases is then each layer's expert
load, summed over microbatches and batch shards, which the bias update reads.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.stack import scan_layers
from models.transformer import embed_activations, head_logits
from parallel.pipeline.executor import run_pipeline
from parallel.pipeline.schedule import Schedule, make_schedule
from parallel.pipeline.vocab import VocabSplit
from parallel.vocab.dispatch import token_cross_entropy
from training.loss import add_loss_gradient, router_loss, uses_segments
from training.state import TrainSetup, with_router_bias


def to_stages(layers, schedule: Schedule):
  """Stacked [n_layers, ...] -> [stages, chunks, layers per part, ...] in the schedule's placement."""
  per_part = jax.tree.leaves(layers)[0].shape[0] // schedule.n_parts
  order = np.asarray([[schedule.part(s, c) for c in range(schedule.chunks)] for s in range(schedule.stages)])
  if np.array_equal(order.reshape(-1), np.arange(schedule.n_parts)):  # stage-major already: no movement
    return jax.tree.map(lambda a: a.reshape(schedule.stages, schedule.chunks, per_part, *a.shape[1:]), layers)
  return jax.tree.map(lambda a: a.reshape(schedule.n_parts, per_part, *a.shape[1:])[order], layers)


def from_stages(grads, schedule: Schedule):
  """The inverse of `to_stages`."""
  order = np.asarray([[schedule.part(s, c) for c in range(schedule.chunks)] for s in range(schedule.stages)])
  inverse = np.argsort(order.reshape(-1))
  return jax.tree.map(lambda a: a.reshape(schedule.n_parts, *a.shape[2:])[inverse].reshape(-1, *a.shape[3:]), grads)


def make_pipelined_grad(setup: TrainSetup, microbatch: Callable) -> Callable:
  """(compute params, batch, router biases or None) -> (gradients of the objective sum, loss sum,
  token count, expert statistics: {"tokens_per_expert": [n_moe, E]} with experts, else {})."""
  cfg, plan = setup.config, setup.plan
  schedule = make_schedule(plan.strategies.pipeline, plan.mesh.shape["stage"], cfg.data.microbatches,
                           plan.strategies.virtual_stages)
  masked, tied = uses_segments(cfg), cfg.model.tie_embeddings
  split = VocabSplit(size=cfg.model.vocab_size, first_dims={"embed": 0},
                     last_dims={"final_norm": {"scale": None}, "out": 0 if tied else 1}) if plan.strategies.pipeline_vocab else None

  stack = "moe_layers" if cfg.model.n_experts else "layers"  # validation: one kind of layer

  def grad(compute, batch, router_bias=None):
    variables = with_router_bias(compute, router_bias)
    fn, _ = nnx.merge(setup.graphdef, variables).layer_fn(plan, stack)
    segments = lambda mb: mb["segment_ids"] if masked else None

    def first_fn(fp, mb):
      return embed_activations(cfg.model, fp["embed"], mb["inputs"], mb["positions"], segments(mb), plan)["x"]

    def part_fn(w, x, mb):
      carry = {"x": x, "positions": mb["positions"], "segment_ids": segments(mb)}
      carry, outputs = scan_layers(fn, w, carry, unroll=cfg.model.scan_unroll)
      if not outputs:
        return carry["x"]
      load_probe = jnp.sum(jax.lax.stop_gradient(outputs["tokens_per_expert"]) * w["mlp"]["router_bias"])
      return add_loss_gradient(carry["x"], jnp.sum(mb["loss_mask"]) * router_loss(cfg.model, outputs) + load_probe)

    def logits_fn(lp, x, mb):
      del mb
      return head_logits(cfg.model, lp["final_norm"]["scale"], lp["out"], x, plan)

    def last_fn(lp, x, mb):
      losses, mask = token_cross_entropy(logits_fn(lp, x, mb), mb["targets"], plan), mb["loss_mask"]
      return jnp.sum(losses * mask), jnp.sum(mask)

    first = {"embed": compute["embed"]}
    last = {"final_norm": compute["final_norm"], "out": compute["embed"] if tied else compute["lm_head"]}
    loss_sum, count, d_first, d_parts, d_last, _ = run_pipeline(
        schedule, first_fn, part_fn, logits_fn if split else last_fn, first, to_stages(variables[stack], schedule),
        last, microbatch(batch), mesh=plan.op_mesh, batch_axes=plan.activation_axes("batch"),
        x_spec=plan.spec((None, "residual_length", "embed"), plan.activations), vocab=split)
    d_layers, stats = from_stages(d_parts, schedule), {}
    if router_bias:  # the biases' "gradient" is the load (see the module docstring)
      mlp = dict(d_layers["mlp"])
      stats = {"tokens_per_expert": mlp.pop("router_bias")}
      d_layers = {**d_layers, "mlp": mlp}
    grads = {**compute, "embed": d_first["embed"] + (d_last["out"] if tied else 0.0), stack: d_layers,
             "final_norm": d_last["final_norm"]}
    if not tied:
      grads["lm_head"] = d_last["out"]
    return grads, loss_sum, count, stats

  return grad
