"""Dropless dispatch (MegaBlocks, Gale et al. 2023): every token-expert pair is computed.

The T*K pairs are sorted by expert (stably), the tokens gathered in that order, the experts run
as grouped matmuls over the sorted rows (expert e's rows contiguous; `grouped_matmul.py` picks
`jax.lax.ragged_dot` or a GPU kernel), and the outputs are put back in pair order and combined
with the routing weights. Nothing is dropped.

Single device here; `expert_parallel.py` sends the sorted rows through an all-to-all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from parallel.experts.ffn import check_expert_args, grouped_ffn


def sort_pairs(experts_TxK: jax.Array, n_experts: int) -> tuple[jax.Array, jax.Array]:
  """(order [T*K]: pair indices t*K + k sorted stably by expert, group sizes [E] int32)."""
  ids = experts_TxK.reshape(-1)
  sizes = jnp.zeros((n_experts,), jnp.int32).at[ids].add(1, mode="drop")
  return jnp.argsort(ids, stable=True).astype(jnp.int32), sizes


def unsort(rows_sorted_PxD: jax.Array, order_P: jax.Array) -> jax.Array:
  """The inverse of rows[order]: row i of the result is the sorted row that came from pair i."""
  inverse = jnp.zeros_like(order_P).at[order_P].set(jnp.arange(order_P.shape[0], dtype=order_P.dtype))
  return rows_sorted_PxD[inverse]


def dropless_experts(x_TxD: jax.Array, weights_TxK: jax.Array, experts_TxK: jax.Array, w_gate_ExDxF: jax.Array,
                     w_up_ExDxF: jax.Array, w_down_ExFxD: jax.Array, *, grouped_matmul: str = "xla",
                     compute_dtype=None) -> tuple[jax.Array, jax.Array]:
  """(y [T, D] in the compute dtype, dropped pairs (always 0.0)) on one device."""
  check_expert_args(x_TxD, weights_TxK, experts_TxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
  dtype = jnp.dtype(compute_dtype or x_TxD.dtype)
  (t, d), k = x_TxD.shape, experts_TxK.shape[1]
  order, sizes = sort_pairs(experts_TxK, w_gate_ExDxF.shape[0])
  rows = x_TxD.astype(dtype)[order // k]
  out = grouped_ffn(rows, sizes, w_gate_ExDxF.astype(dtype), w_up_ExDxF.astype(dtype), w_down_ExFxD.astype(dtype),
                    grouped_matmul)
  out_TxKxD = unsort(out, order).reshape(t, k, d)
  y = jnp.einsum("tk,tkd->td", weights_TxK.astype(jnp.float32), out_TxKxD.astype(jnp.float32))
  return y.astype(dtype), jnp.zeros((), jnp.float32)
