"""The training loss: masked token cross-entropy of a packed batch, summed, with its token count.

A batch (see `data.pipeline.Dataset`) is a dict of [B, L] arrays: int32 `inputs`, `targets`,
`segment_ids`, `positions` and float32 `loss_mask`. The loss is sum(mask * CE) over the batch,
returned with sum(mask), so callers normalise by the tokens of the whole global batch.

With mixture-of-experts layers the training objective adds the router losses (`loss_terms`):
model.aux_loss_weight x the Switch loss, model.seq_aux_loss_weight x DeepSeek's sequence-wise loss
and model.z_loss_weight x the router z-loss, each summed over the MoE layers, per counted token
(so that after the normalisation by the token count they add to the mean cross-entropy as is).

With a distillation teacher (`training.distill`) the batch also holds `teacher_logits` [B, L, V],
already in the plan's token order, and the objective mixes the cross-entropy with the KL
divergence from the teacher's tempered distribution (`distillation_losses`, Hinton et al. 2015).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from configs import Config, DistillConfig, ModelConfig
from parallel.attention.dispatch import order_batch
from parallel.plan import ShardingPlan
from parallel.vocab.dispatch import token_cross_entropy

Batch = dict[str, jax.Array]


def uses_segments(config: Config) -> bool:
  """Whether attention is masked to documents: synthetic tokens have none, and users may opt out."""
  return config.data.mask_documents and config.data.source != "synthetic"


def model_logits(model: Any, batch: Batch, plan: ShardingPlan, mask_documents: bool = True) -> tuple[jax.Array, dict]:
  """(logits [B, L, V], per-layer outputs) of the model's three pieces, for a batch already in the
  plan's token order (`order_batch`)."""
  segments = batch["segment_ids"] if mask_documents else None
  carry = model.embed_tokens(batch["inputs"], batch["positions"], segments, plan=plan)
  carry, layer_outputs = model.forward_layers(carry, plan=plan)
  return model.head(carry["x"], plan=plan), layer_outputs


def token_losses(model: Any, batch: Batch, plan: ShardingPlan, mask_documents: bool = True) -> tuple[jax.Array, dict]:
  """(float32 per-token cross-entropy [B, L], per-layer outputs) of the model's three pieces, for
  a batch already in the plan's token order (`order_batch`)."""
  logits, layer_outputs = model_logits(model, batch, plan, mask_documents)
  return token_cross_entropy(logits, batch["targets"], plan), layer_outputs


def distillation_losses(student_BxLxV: jax.Array, teacher_BxLxV: jax.Array, temperature: float) -> jax.Array:
  """Float32 per-token KL(softmax(teacher / T) || softmax(student / T)) [B, L]: the teacher's
  distribution as the target, so the student is pulled towards every token the teacher finds likely."""
  log_p = jax.nn.log_softmax(teacher_BxLxV.astype(jnp.float32) / temperature, axis=-1)
  log_q = jax.nn.log_softmax(student_BxLxV.astype(jnp.float32) / temperature, axis=-1)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def loss_sum_and_count(graphdef: nnx.GraphDef, params: Any, batch: Batch, plan: ShardingPlan,
                       mask_documents: bool = True) -> tuple[jax.Array, jax.Array]:
  """Sum of masked token losses and the number of counted tokens (float32 scalars).

  The tokens are first laid out in the order the plan's attention method expects over `seq`, with
  everything that belongs to them; the sums do not depend on the order.
  """
  batch = order_batch(batch, plan)
  losses, _ = token_losses(nnx.merge(graphdef, params), batch, plan, mask_documents)
  mask = batch["loss_mask"]
  return jnp.sum(losses * mask), jnp.sum(mask)


def merge_expert_stats(stats_per_microbatch: dict) -> dict:
  """Statistics stacked over microbatches -> the step's: counts and the distillation KL sum summed,
  router losses averaged."""
  return {k: (jnp.sum(v, axis=0) if k in ("tokens_per_expert", "dropped", "distill_kl") else jnp.mean(v, axis=0))
          for k, v in stats_per_microbatch.items()}


def router_loss(cfg: ModelConfig, stats: dict) -> jax.Array:
  """The weighted router losses, summed over the MoE layers (0.0 for a dense model)."""
  if not stats:
    return jnp.zeros((), jnp.float32)
  return (cfg.aux_loss_weight * jnp.sum(stats["aux_loss"]) + cfg.seq_aux_loss_weight * jnp.sum(stats["seq_aux_loss"])
          + cfg.z_loss_weight * jnp.sum(stats["z_loss"]))


def loss_terms(graphdef: nnx.GraphDef, variables: Any, batch: Batch, plan: ShardingPlan, mask_documents: bool,
               cfg: ModelConfig, distill: DistillConfig) -> tuple[jax.Array, tuple[jax.Array, jax.Array, dict]]:
  """(objective sum, (cross-entropy sum, counted tokens, statistics)): the objective is the
  cross-entropy sum plus counted tokens x `router_loss`. `variables`: the model's whole variable
  tree (parameters and router biases, `training.state.with_router_bias`). Statistics: the expert
  ones (`models.moe.MOE_OUTPUTS` per MoE layer; none for a dense model) and, where the batch holds
  `teacher_logits`, "distill_kl": the KL sum over counted tokens; the objective's cross-entropy is
  then weighted by 1 - distill.weight and the KL sum, times temperature^2 (which keeps its
  gradient's scale independent of the temperature), by distill.weight."""
  teacher = batch.get("teacher_logits")
  batch = order_batch({k: v for k, v in batch.items() if k != "teacher_logits"}, plan)
  logits, layer_outputs = model_logits(nnx.merge(graphdef, variables), batch, plan, mask_documents)
  mask = batch["loss_mask"]
  loss_sum, count = jnp.sum(token_cross_entropy(logits, batch["targets"], plan) * mask), jnp.sum(mask)
  stats = dict(layer_outputs)
  objective = loss_sum + count * router_loss(cfg, stats)
  if teacher is not None:
    kl_sum = jnp.sum(distillation_losses(logits, teacher, distill.temperature) * mask)
    objective += distill.weight * (distill.temperature ** 2 * kl_sum - loss_sum)
    stats["distill_kl"] = kl_sum
  return objective, (loss_sum, count, stats)


@jax.custom_vjp
def add_loss_gradient(x: jax.Array, loss: jax.Array) -> jax.Array:
  """x unchanged; its backward also differentiates `loss` (with cotangent 1) into whatever
  produced it. A pipeline part adds its MoE layers' router losses to the objective this way, as
  the executor only carries activations and their gradients (Megatron-Core's MoEAuxLossAutoScaler)."""
  del loss
  return x


def _add_loss_gradient_fwd(x, loss):
  return x, loss


def _add_loss_gradient_bwd(loss, g):
  return g, jnp.ones_like(loss)


add_loss_gradient.defvjp(_add_loss_gradient_fwd, _add_loss_gradient_bwd)
