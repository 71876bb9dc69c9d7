"""Capacity-based dispatch (GShard, Lepikhin et al. 2020; Switch Transformer, Fedus et al. 2022).

Each expert takes at most C = ceil(capacity_factor * T * K / E) token-expert pairs of a dispatch
group (here: the T tokens given; under expert parallelism, each device's tokens, or each chunk of
them). Pairs claim slots in GShard's priority order: every token's first choice before any token's
second choice, and within one choice earlier tokens first. Pairs past an expert's capacity are
dropped: they add nothing to the output (the residual stream carries the token) and are counted.
The experts then run as dense batched matmuls over [E, C, D] slots, and each token's output is
the weighted sum of its kept pairs' slots.

Single device here; `expert_parallel.py` runs the same slots through an all-to-all.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from parallel.experts.ffn import batched_ffn, check_expert_args
from parallel.experts.permute import gather_rows


def capacity(n_tokens: int, top_k: int, n_experts: int, factor: float) -> int:
  """Slots per expert for a group of `n_tokens`: ceil(factor * n_tokens * top_k / n_experts), at least 1."""
  if factor <= 0:
    raise ValueError(f"capacity_factor={factor} must be > 0")
  return max(1, math.ceil(factor * n_tokens * top_k / n_experts))


def rank_within_groups(ids_N: jax.Array, n_groups: int) -> jax.Array:
  """For each element, how many elements before it (in the given order) have the same id."""
  n = ids_N.shape[0]
  order = jnp.argsort(ids_N, stable=True)
  counts = jnp.zeros((n_groups,), jnp.int32).at[ids_N].add(1, mode="drop")
  starts = jnp.cumsum(counts) - counts
  rank_sorted = jnp.arange(n, dtype=jnp.int32) - starts[ids_N[order]]
  return jnp.zeros((n,), jnp.int32).at[order].set(rank_sorted)


def capacity_slots(experts_TxK: jax.Array, n_experts: int, slots_per_expert: int) -> tuple[jax.Array, jax.Array]:
  """(slot [T, K] int32, dropped pairs float32): slot = expert * C + position for kept pairs,
  E * C (one past the last slot) for dropped ones; positions in GShard's priority order."""
  t, k = experts_TxK.shape
  priority_ids = experts_TxK.T.reshape(-1)  # choice-major: all first choices, then all second ...
  position = rank_within_groups(priority_ids, n_experts).reshape(k, t).T
  kept = position < slots_per_expert
  slot = jnp.where(kept, experts_TxK * slots_per_expert + position, n_experts * slots_per_expert)
  return slot.astype(jnp.int32), jnp.sum(~kept).astype(jnp.float32)


def _owner_of_slot(slot_TxK: jax.Array, n_slots: int, per_token: bool) -> jax.Array:
  """[n_slots]: the token (or the pair t * K + k) that claimed each slot; T (or T * K) if none."""
  t, k = slot_TxK.shape
  owner = jnp.arange(t * k, dtype=jnp.int32) // (k if per_token else 1)
  none = t if per_token else t * k
  # Dropped pairs (slot n_slots) land in the extra last entry, which is cut off.
  return jnp.full((n_slots + 1,), none, jnp.int32).at[slot_TxK.reshape(-1)].set(owner)[:n_slots]


def gather_slots(x_TxD: jax.Array, slot_TxK: jax.Array, n_slots: int) -> jax.Array:
  """[n_slots, D]: each slot holds the token that claimed it, empty slots zeros."""
  return gather_rows(x_TxD, _owner_of_slot(slot_TxK, n_slots, per_token=True), slot_TxK)


def combine_slots(out_SxD: jax.Array, slot_TxK: jax.Array, weights_TxK: jax.Array) -> jax.Array:
  """[T, D] float32: sum over k of weight * the pair's slot output (dropped pairs read zeros)."""
  t, k = slot_TxK.shape
  pair_of_slot = _owner_of_slot(slot_TxK, out_SxD.shape[0], per_token=False)
  per_pair = gather_rows(out_SxD, slot_TxK.reshape(-1), pair_of_slot[:, None]).reshape(t, k, -1)
  return jnp.einsum("tk,tkd->td", weights_TxK.astype(jnp.float32), per_pair.astype(jnp.float32))


def capacity_experts(x_TxD: jax.Array, weights_TxK: jax.Array, experts_TxK: jax.Array, w_gate_ExDxF: jax.Array,
                     w_up_ExDxF: jax.Array, w_down_ExFxD: jax.Array, *, capacity_factor: float,
                     compute_dtype=None) -> tuple[jax.Array, jax.Array]:
  """(y [T, D] in the compute dtype, dropped pairs float32) on one device: y_t = sum over kept
  pairs (t, k) of weights[t, k] * SwiGLU_{experts[t, k]}(x_t)."""
  check_expert_args(x_TxD, weights_TxK, experts_TxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
  dtype = jnp.dtype(compute_dtype or x_TxD.dtype)
  (t, _), (n_experts, k) = x_TxD.shape, (w_gate_ExDxF.shape[0], experts_TxK.shape[1])
  c = capacity(t, k, n_experts, capacity_factor)
  slot, dropped = capacity_slots(experts_TxK, n_experts, c)
  slots_ExCxD = gather_slots(x_TxD.astype(dtype), slot, n_experts * c).reshape(n_experts, c, -1)
  out = batched_ffn(slots_ExCxD, w_gate_ExDxF.astype(dtype), w_up_ExDxF.astype(dtype), w_down_ExFxD.astype(dtype))
  return combine_slots(out.reshape(n_experts * c, -1), slot, weights_TxK).astype(dtype), dropped
