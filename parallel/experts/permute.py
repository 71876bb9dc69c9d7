"""Row gathers whose backward is a gather too, not a scatter-add.

Dispatch moves rows around: tokens to sorted pairs, pairs to slots and back. Autodiff transposes
each gather `x[index]` into a scatter-add, which on GPUs runs as atomic adds: slow for bf16 rows
and not deterministic from run to run. Here every gather comes with its users: for each source
row, the (at most R) output rows that read it, so the backward is R gathers and a sum, in a fixed
order. (A token is read by its K pairs; a slot or a sorted row by one pair.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
  """x[index] with out-of-range indices (the "none" marker) reading zeros, without copying x."""
  return x.at[index].get(mode="fill", fill_value=0)


@jax.custom_vjp
def gather_rows(x_NxD: jax.Array, index_M: jax.Array, users_NxR: jax.Array) -> jax.Array:
  """rows[m] = x[index[m]], an index of N meaning a zero row. `users[n]` lists the output rows
  that read row n (M for none); it must be exactly the inverse of `index`."""
  return _take(x_NxD, index_M)


def _fwd(x, index, users):
  return gather_rows(x, index, users), users


def _bwd(users, d_rows_MxD):
  d_x = jnp.sum(_take(d_rows_MxD, users).astype(jnp.float32), axis=1).astype(d_rows_MxD.dtype)
  return d_x, None, None


gather_rows.defvjp(_fwd, _bwd)



def inverse_permutation(order_N: jax.Array) -> jax.Array:
  """inverse[order[i]] = i."""
  return jnp.zeros_like(order_N).at[order_N].set(jnp.arange(order_N.shape[0], dtype=order_N.dtype),
                                                 unique_indices=True)


def permute_rows(x_NxD: jax.Array, order_N: jax.Array, inverse_N: jax.Array) -> jax.Array:
  """x[order] (a permutation; `inverse` its inverse), with a gather as its backward."""
  return gather_rows(x_NxD, order_N, inverse_N[:, None])
