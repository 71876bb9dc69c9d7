"""Top-k routing of tokens to experts, in float32.

Two score functions:
  softmax   softmax over the experts, then top-k (Switch, GShard, Mixtral, Qwen-MoE);
  sigmoid   an independent sigmoid per expert, then top-k (DeepSeek-V3, Liu et al. 2024).
Either can renormalise the chosen k weights to sum to 1 (`normalize`; Mixtral, DeepSeek-V3) and
multiply them by a routed scaling factor (`scale`; DeepSeek-V3's routed_scaling_factor).

Group-limited routing (DeepSeek-V2/V3): the E experts form `n_groups` equal groups; a group's
score is the sum of its two highest selection scores (DeepSeek-V3; the highest one when a group
holds a single expert); each token keeps its `topk_groups` best groups and picks its k experts
inside them.

Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias is added to the scores for the
*selection* only; the weights are always the unbiased scores of the chosen experts.

Ties between equal selection scores go to the lower expert index (as `jax.lax.top_k` orders them).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

SCORES = ("softmax", "sigmoid")


class Routing(NamedTuple):
  """weights [T, K] float32 (what each chosen expert's output is multiplied by), experts [T, K]
  int32 (the chosen expert ids, best first), probs [T, E] float32 (the scores before the bias:
  what the balancing losses read)."""

  weights: jax.Array
  experts: jax.Array
  probs: jax.Array


def _check(logits_TxE: jax.Array, top_k: int, score: str, bias_E: jax.Array | None, n_groups: int,
           topk_groups: int) -> None:
  if logits_TxE.ndim != 2:
    raise ValueError(f"router logits must be [tokens, experts], got shape {logits_TxE.shape}")
  n_experts = logits_TxE.shape[1]
  if score not in SCORES:
    raise ValueError(f"score={score!r}: choose one of {SCORES}")
  if not 1 <= top_k <= n_experts:
    raise ValueError(f"top_k={top_k} must be between 1 and the {n_experts} experts")
  if bias_E is not None and bias_E.shape != (n_experts,):
    raise ValueError(f"bias shape {bias_E.shape} must be ({n_experts},)")
  if n_groups < 1 or n_experts % n_groups:
    raise ValueError(f"n_groups={n_groups} must divide the {n_experts} experts")
  if not 1 <= topk_groups <= n_groups:
    raise ValueError(f"topk_groups={topk_groups} must be between 1 and n_groups={n_groups}")
  if top_k > topk_groups * (n_experts // n_groups):
    raise ValueError(f"top_k={top_k} exceeds the {topk_groups * (n_experts // n_groups)} experts of the "
                     f"topk_groups={topk_groups} groups a token may use")


def _limit_to_groups(select_TxE: jax.Array, n_groups: int, topk_groups: int) -> jax.Array:
  """The selection scores with every expert outside a token's best `topk_groups` groups at -inf."""
  t, e = select_TxE.shape
  grouped = select_TxE.reshape(t, n_groups, e // n_groups)
  best = jax.lax.top_k(grouped, min(2, e // n_groups))[0]
  _, keep_groups = jax.lax.top_k(best.sum(-1), topk_groups)  # [T, topk_groups]
  keep = jnp.zeros((t, n_groups), bool).at[jnp.arange(t)[:, None], keep_groups].set(True)
  return jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(t, e)


def route(logits_TxE: jax.Array, *, top_k: int, score: str = "softmax", bias_E: jax.Array | None = None,
          n_groups: int = 1, topk_groups: int = 1, normalize: bool = True, scale: float = 1.0) -> Routing:
  """Routes T tokens to `top_k` of E experts from the router's logits [T, E] (any float dtype).

  Gradients reach the logits through `weights` (the expert ids are integers); the bias gets none.
  """
  _check(logits_TxE, top_k, score, bias_E, n_groups, topk_groups)
  logits = logits_TxE.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1) if score == "softmax" else jax.nn.sigmoid(logits)
  # The selection is piecewise constant: no gradient flows through it (nor into the bias).
  select = jax.lax.stop_gradient(probs if bias_E is None else probs + bias_E.astype(jnp.float32))
  if n_groups > 1:
    select = _limit_to_groups(select, n_groups, topk_groups)
  _, experts = jax.lax.top_k(select, top_k)
  weights = jnp.take_along_axis(probs, experts, axis=-1)
  if normalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return Routing(weights * scale, experts.astype(jnp.int32), probs)

