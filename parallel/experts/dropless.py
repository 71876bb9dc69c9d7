"""Dropless dispatch (MegaBlocks, Gale et al. 2023): every token-expert pair is computed.

The T*K pairs are sorted by expert (stably), the tokens gathered in that order, the experts run
as grouped matmuls over the sorted rows (expert e's rows contiguous; `grouped_matmul.py` picks
`jax.lax.ragged_dot` or a GPU kernel), and the outputs are put back in pair order and combined
with the routing weights. Nothing is dropped. With `rounds` (rounds.py) the expert slots gather
the tokens and scatter to the pairs directly through the sort's index maps.

Single device here; `expert_parallel.py` sends the sorted rows through an all-to-all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from parallel.experts.ffn import batched_ffn, check_expert_args, grouped_ffn
from parallel.experts.grouped_matmul import resolve
from parallel.experts.permute import gather_rows, inverse_permutation, permute_rows
from parallel.experts.rounds import RowMaps, rounds_ffn


def sort_pairs(experts_TxK: jax.Array, n_experts: int) -> tuple[jax.Array, jax.Array]:
  """(order [T*K]: pair indices t*K + k sorted stably by expert, group sizes [E] int32)."""
  ids = experts_TxK.reshape(-1)
  # A one-hot sum, not a scatter-add: on GPUs M atomic adds into E counters contend.
  sizes = jnp.sum(ids[:, None] == jnp.arange(n_experts, dtype=ids.dtype), axis=0, dtype=jnp.int32)
  m = ids.shape[0]
  if (n_experts + 1) * m < 2**31:
    # One int32 key (expert, pair index) sorted alone: the same stable order as an argsort, as a
    # single-operand sort (GPUs run it as a radix sort) with the order read off the keys.
    key = ids.astype(jnp.int32) * m + jnp.arange(m, dtype=jnp.int32)
    return jnp.sort(key) % m, sizes
  return jnp.argsort(ids, stable=True).astype(jnp.int32), sizes


def gather_tokens(x_TxD: jax.Array, order_P: jax.Array, inverse_P: jax.Array, top_k: int) -> jax.Array:
  """[T*K, D]: row i is the token of pair order[i]; its backward sums each token's K rows."""
  return gather_rows(x_TxD, order_P // top_k, inverse_P.reshape(-1, top_k))


def dropless_experts(x_TxD: jax.Array, weights_TxK: jax.Array, experts_TxK: jax.Array, w_gate_ExDxF: jax.Array,
                     w_up_ExDxF: jax.Array, w_down_ExFxD: jax.Array, *, grouped_matmul: str = "xla",
                     compute_dtype=None) -> tuple[jax.Array, jax.Array]:
  """(y [T, D] in the compute dtype, dropped pairs (always 0.0)) on one device."""
  check_expert_args(x_TxD, weights_TxK, experts_TxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
  dtype = jnp.dtype(compute_dtype or x_TxD.dtype)
  (t, d), k = x_TxD.shape, experts_TxK.shape[1]
  order, sizes = sort_pairs(experts_TxK, w_gate_ExDxF.shape[0])
  inverse = inverse_permutation(order)
  weights = (w_gate_ExDxF.astype(dtype), w_up_ExDxF.astype(dtype), w_down_ExFxD.astype(dtype))
  if resolve(grouped_matmul) == "rounds":
    # The slots read the tokens and write the pairs directly: no sorted [T*K, D] copy either way.
    maps = RowMaps(src=order // k, src_users=inverse.reshape(t, k), dst=order, dst_src=inverse)
    out_TxKxD = rounds_ffn(x_TxD.astype(dtype), sizes, *weights, batched_ffn, maps=maps).reshape(t, k, d)
  else:
    rows = gather_tokens(x_TxD.astype(dtype), order, inverse, k)
    out = grouped_ffn(rows, sizes, *weights, grouped_matmul)
    out_TxKxD = permute_rows(out, inverse, order).reshape(t, k, d)  # back in pair order
  y = jnp.einsum("tk,tkd->td", weights_TxK.astype(jnp.float32), out_TxKxD.astype(jnp.float32))
  return y.astype(dtype), jnp.zeros((), jnp.float32)
