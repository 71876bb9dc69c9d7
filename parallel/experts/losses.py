"""Load-balancing losses, the router z-loss and the auxiliary-loss-free bias update.

switch_aux_loss     Switch Transformer (Fedus et al. 2022) / GShard: E * sum_e f_e * P_e, with f_e the
                    fraction of the T*K token-expert pairs routed to expert e and P_e the mean router
                    probability of e; 1 when perfectly balanced (Megatron-Core's normalisation).
sequence_aux_loss   DeepSeek-V3's sequence-wise balance loss: per sequence,
                    sum_e (E / (K L) * count_e) * mean_t s'_{t,e}, with s' the scores normalised
                    to sum to 1 over the experts; averaged over the sequences.
z_loss              ST-MoE (Zoph et al. 2022): mean over tokens of logsumexp(logits)^2.
expert_load         tokens routed to each expert (before any capacity drop).
update_bias         DeepSeek-V3's auxiliary-loss-free balancing: bias + rate * sign(mean load - load).

Every loss is float32 and differentiable in the probabilities (the counts are integers). Under a
`shard_map` that is manual over batch axes (a pipeline's executor), `axis_names` names them: the
sums and counts each loss averages are summed over those axes first, so every shard computes the
loss of all the rows (as one device would), not of its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def expert_load(experts_TxK: jax.Array, n_experts: int) -> jax.Array:
  """Token-expert pairs routed to each expert, [E] float32 (any leading shape of ids)."""
  ids = experts_TxK.reshape(-1)
  return jnp.zeros((n_experts,), jnp.float32).at[ids].add(1.0, mode="drop")


def _total(x, axis_names: tuple[str, ...]) -> jax.Array:
  x = jnp.asarray(x, jnp.float32)
  return jax.lax.psum(x, axis_names) if axis_names else x


def switch_aux_loss(probs_TxE: jax.Array, experts_TxK: jax.Array, n_experts: int,
                    axis_names: tuple[str, ...] = ()) -> jax.Array:
  """E * sum_e f_e P_e (f: fraction of pairs routed to e; P: mean probability of e)."""
  if probs_TxE.shape[-1] != n_experts:
    raise ValueError(f"probs have {probs_TxE.shape[-1]} experts, n_experts={n_experts}")
  probs = probs_TxE.reshape(-1, n_experts).astype(jnp.float32)
  fraction = _total(expert_load(experts_TxK, n_experts), axis_names) / _total(experts_TxK.size, axis_names)
  mean_prob = _total(jnp.sum(probs, axis=0), axis_names) / _total(probs.shape[0], axis_names)
  return n_experts * jnp.sum(fraction * mean_prob)


def sequence_aux_loss(probs_BxLxE: jax.Array, experts_BxLxK: jax.Array, n_experts: int,
                      axis_names: tuple[str, ...] = ()) -> jax.Array:
  """DeepSeek-V3's sequence-wise balance loss (without its weight alpha), mean over sequences."""
  if probs_BxLxE.ndim != 3 or experts_BxLxK.ndim != 3 or probs_BxLxE.shape[:2] != experts_BxLxK.shape[:2]:
    raise ValueError(f"want probs [B, L, E] and experts [B, L, K], got {probs_BxLxE.shape} and {experts_BxLxK.shape}")
  _, length, top_k = experts_BxLxK.shape
  counts_BxE = jax.vmap(lambda e: expert_load(e, n_experts))(experts_BxLxK)
  f_BxE = counts_BxE * (n_experts / (top_k * length))
  p = probs_BxLxE.astype(jnp.float32)
  p_BxE = jnp.mean(p / jnp.sum(p, axis=-1, keepdims=True), axis=1)
  per_sequence = jnp.sum(f_BxE * p_BxE, axis=-1)
  return _total(jnp.sum(per_sequence), axis_names) / _total(per_sequence.shape[0], axis_names)


def z_loss(logits_TxE: jax.Array, axis_names: tuple[str, ...] = ()) -> jax.Array:
  """Mean over tokens of logsumexp(router logits)^2 (float32)."""
  lse = jax.nn.logsumexp(logits_TxE.astype(jnp.float32), axis=-1)
  return _total(jnp.sum(jnp.square(lse)), axis_names) / _total(lse.size, axis_names)


def update_bias(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
  """One step of auxiliary-loss-free balancing: underloaded experts' bias up, overloaded down."""
  load = load_E.astype(jnp.float32)
  return (bias_E.astype(jnp.float32) + rate * jnp.sign(jnp.mean(load) - load)).astype(bias_E.dtype)
