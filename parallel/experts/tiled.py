"""Dropless experts as dense batched matmuls over expert-aligned tiles (static shapes, no ragged op).

XLA's `ragged_dot` costs about E times a dense matmul on GPUs (every group over every row). Here
each expert's sorted rows are padded to a whole number of tiles of `tile` rows, so every tile
belongs to one expert; at most ceil(M / tile) + E tiles exist whatever the routing (each group
wastes less than one tile), a bound known at compile time. Each tile's expert weights are
selected with a one-hot matmul ([tiles, E] x [E, D, F]: exact, and its transpose sums the tiles'
weight gradients per expert without scatter-adds), and the FFN runs as one batched matmul over
[tiles, tile, D]. Cost: up to E x tile padded rows, and [tiles, D, F] weight copies (made again
for the backward rather than kept), against ragged_dot's E-fold work. Expert-aligned blocks of
rows are MegaBlocks' idea (Gale et al. 2023), here without a custom kernel.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from parallel.experts.permute import gather_rows

MAX_TILE = 512  # rows per tile on GPUs: large enough to run near dense matmul speed


def tile_rows(n_rows: int, n_experts: int) -> int:
  """Rows per tile: MAX_TILE, or for few rows per expert the power of two (at least 8) above the mean."""
  mean = max(1, -(-n_rows // n_experts))
  return min(MAX_TILE, max(8, 1 << math.ceil(math.log2(mean))))


def tiled_ffn(rows_MxD: jax.Array, group_sizes_E: jax.Array, w_gate_ExDxF: jax.Array, w_up_ExDxF: jax.Array,
              w_down_ExFxD: jax.Array, ffn) -> jax.Array:
  """[M, D] rows sorted by expert -> [M, D], with `ffn` the batched SwiGLU ([N, C, D] and [N, ...]
  weights). Rows past the sum of the group sizes come out zero."""
  (m, d), e = rows_MxD.shape, w_gate_ExDxF.shape[0]
  tile = tile_rows(m, e)
  n_tiles = -(-m // tile) + e
  sizes = group_sizes_E.astype(jnp.int32)
  tiles_per = -(-sizes // tile)
  first_tile = jnp.cumsum(tiles_per) - tiles_per
  group_start = jnp.cumsum(sizes) - sizes
  row = jnp.arange(m, dtype=jnp.int32)
  expert_of_row = jnp.clip(jnp.searchsorted(jnp.cumsum(sizes), row, side="right"), 0, e - 1)
  used = row < jnp.sum(sizes)
  # Padded position of each real row; rows past the groups go nowhere (n_tiles * tile).
  position = jnp.where(used, first_tile[expert_of_row] * tile + row - group_start[expert_of_row], n_tiles * tile)
  source = jnp.full((n_tiles * tile + 1,), m, jnp.int32).at[position].set(row)[:-1]
  x_tiles = gather_rows(rows_MxD, source, position[:, None]).reshape(n_tiles, tile, d)
  tile_expert = jnp.clip(jnp.searchsorted(jnp.cumsum(tiles_per), jnp.arange(n_tiles), side="right"), 0, e - 1)
  one_hot = jax.nn.one_hot(tile_expert, e, dtype=rows_MxD.dtype)

  # The backward keeps the gate and up projections (named in `ffn`) and makes the per-tile weight
  # copies ([tiles, D, F] each) again rather than keeping them.
  @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.save_only_these_names("expert_gate", "expert_up"))
  def run(x_tiles, one_hot, *weights):
    return ffn(x_tiles, *(jnp.einsum("ne,e...->n...", one_hot, w) for w in weights))

  out = run(x_tiles, one_hot, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
  return gather_rows(out.reshape(n_tiles * tile, d), position, source[:, None])
