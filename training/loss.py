"""The training loss: masked token cross-entropy of a packed batch, summed, with its token count.

A batch (see `data.pipeline.Dataset`) is a dict of [B, L] arrays: int32 `inputs`, `targets`,
`segment_ids`, `positions` and float32 `loss_mask`. The loss is sum(mask * CE) over the batch,
returned with sum(mask), so callers normalise by the tokens of the whole global batch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from configs import Config
from parallel.attention.dispatch import order_batch
from parallel.plan import ShardingPlan
from parallel.vocab.dispatch import token_cross_entropy

Batch = dict[str, jax.Array]


def uses_segments(config: Config) -> bool:
  """Whether attention is masked to documents: synthetic tokens have none, and users may opt out."""
  return config.data.mask_documents and config.data.source != "synthetic"


def token_losses(model: Any, batch: Batch, plan: ShardingPlan, mask_documents: bool = True) -> tuple[jax.Array, dict]:
  """(float32 per-token cross-entropy [B, L], per-layer outputs) of the model's three pieces, for
  a batch already in the plan's token order (`order_batch`)."""
  segments = batch["segment_ids"] if mask_documents else None
  carry = model.embed_tokens(batch["inputs"], batch["positions"], segments, plan=plan)
  carry, layer_outputs = model.forward_layers(carry, plan=plan)
  logits = model.head(carry["x"], plan=plan)
  return token_cross_entropy(logits, batch["targets"], plan), layer_outputs


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
