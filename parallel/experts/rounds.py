"""Dropless experts as dense batched matmuls in rounds of [E, C, D] slots (static shapes, exact).

Rows arrive sorted by expert (expert e's `sizes[e]` rows together). Round r gives every expert C
slots and puts rows r*C .. (r+1)*C - 1 of each group into them (a gather), runs the SwiGLU as
batched matmuls on [E, C, D] with the expert weights as they are (no per-tile weight copies, no
ragged kernel), and gathers the outputs back to their rows. Rounds repeat until the largest group
is covered, so no row is dropped whatever the routing.

  round 0   C0 slots per expert, C0 = the mean group size x `factor`, rounded up to 128 rows:
            ordinary autodiff (its activations kept for the backward, like any matmul);
  spill     the rows past C0 of the groups that overflow, in rounds of C1 = C0 / 4 slots per
            expert. Their number is data-dependent (0 under balanced routing), so they run in a
            `while_loop` with that trip count, under a custom VJP whose backward loops over the
            same rounds again, recomputing each round's forward (nothing kept per round) and
            accumulating the weight gradients in float32.

Cost: E x C0 - M padded rows in round 0 (none when M / E is a multiple of 128 and the load is
balanced); under skew, E x C1 rows per spill round plus its recomputation. The gathers are
`permute.gather_rows`: their backward is a gather too (no scatter-adds). Rows past the sum of
the group sizes (padding) are in no slot and come out zero. Capacity slots per expert follow
GShard (Lepikhin et al. 2020); covering every row in extra rounds keeps it dropless (MegaBlocks,
Gale et al. 2023) without a grouped kernel.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from parallel.experts.permute import gather_rows

CAPACITY_FACTOR = 1.0  # round-0 slots per expert, in units of the mean group size
ALIGN = 128  # slot counts are multiples of this on GPU-sized groups (dense matmul tiles)


def _align(n: int) -> int:
  """n rounded up to ALIGN (or to 8 for small groups, as the CPU tests use)."""
  step = ALIGN if n >= 4 * ALIGN else 8
  return max(step, -(-n // step) * step)


def round_capacities(n_rows: int, n_experts: int, factor: float = CAPACITY_FACTOR) -> tuple[int, int]:
  """(C0, C1): slots per expert in round 0 and in each spill round, for `n_rows` expected rows."""
  if factor <= 0:
    raise ValueError(f"rounds capacity factor={factor}: must be > 0")
  c0 = _align(math.ceil(n_rows * factor / n_experts))
  return c0, _align(c0 // 4)


def _layout(sizes_E: jax.Array, n_rows: int):
  """(starts [E], expert of each row [M] (E for rows past the groups), position in its group [M])."""
  e = sizes_E.shape[0]
  ends = jnp.cumsum(sizes_E)
  starts = ends - sizes_E
  row = jnp.arange(n_rows, dtype=jnp.int32)
  expert = jnp.searchsorted(ends, row, side="right").astype(jnp.int32)  # E past the last group
  within = row - starts[jnp.minimum(expert, e - 1)]
  return starts, expert, within


def _round_index(sizes_E, layout, n_rows: int, offset, cap: int):
  """(source [E*cap]: the row in each slot (n_rows: empty), slot [M]: each row's slot (E*cap: not
  in this round)) for the round holding positions offset .. offset + cap - 1 of every group."""
  starts, expert, within = layout
  e = sizes_E.shape[0]
  pos = offset + jnp.arange(cap, dtype=jnp.int32)[None, :]
  source = jnp.where(pos < sizes_E[:, None], starts[:, None] + pos, n_rows).reshape(-1)
  inside = (expert < e) & (within >= offset) & (within < offset + cap)
  slot = jnp.where(inside, expert * cap + within - offset, e * cap)
  return source, slot


def _run_round(rows_MxD, weights, sizes_E, layout, offset, cap: int, ffn) -> jax.Array:
  """[M, D] outputs of the rows in this round's slots (zeros elsewhere)."""
  (m, d), e = rows_MxD.shape, sizes_E.shape[0]
  source, slot = _round_index(sizes_E, layout, m, offset, cap)
  x = gather_rows(rows_MxD, source, slot[:, None]).reshape(e, cap, d)
  out = ffn(x, *weights).reshape(e * cap, d)
  return gather_rows(out, slot, source[:, None])


def _spill(rows_MxD, weights, sizes_E, *, c0: int, c1: int, ffn):
  """The rows past C0 of every group, in data-dependent rounds of C1 slots (custom VJP, below)."""
  m = rows_MxD.shape[0]

  def count(sizes):
    return (jnp.max(jnp.maximum(sizes - c0, 0)) + c1 - 1) // c1

  def one(r, rows, ws, sizes):
    return _run_round(rows, ws, sizes, _layout(sizes, m), c0 + r * c1, c1, ffn)

  @jax.custom_vjp
  def spill(rows, ws, sizes):
    return jax.lax.fori_loop(0, count(sizes), lambda r, acc: acc + one(r, rows, ws, sizes), jnp.zeros_like(rows))

  def fwd(rows, ws, sizes):
    return spill(rows, ws, sizes), (rows, ws, sizes)

  def bwd(res, d_out):
    rows, ws, sizes = res

    def body(r, acc):
      d_rows, d_ws = acc
      _, vjp = jax.vjp(lambda x, *w: one(r, x, w, sizes), rows, *ws)
      g = vjp(d_out)
      # Each row is in exactly one round: its gradient is added to zeros (exact in any dtype).
      return d_rows + g[0], tuple(a + b.astype(jnp.float32) for a, b in zip(d_ws, g[1:]))

    # zeros_like keeps the manual axes the weights vary over (a loop carry inside `shard_map`
    # must keep its type).
    init = (jnp.zeros_like(rows), tuple(jnp.zeros_like(w, jnp.float32) for w in ws))
    d_rows, d_ws = jax.lax.fori_loop(0, count(sizes), body, init)
    return d_rows, tuple(g.astype(w.dtype) for g, w in zip(d_ws, ws)), None

  spill.defvjp(fwd, bwd)
  return spill(rows_MxD, tuple(weights), sizes_E)


def rounds_ffn(rows_MxD: jax.Array, group_sizes_E: jax.Array, w_gate_ExDxF: jax.Array, w_up_ExDxF: jax.Array,
               w_down_ExFxD: jax.Array, ffn, *, expected_rows: int | None = None,
               factor: float = CAPACITY_FACTOR) -> jax.Array:
  """[M, D] rows sorted by expert -> [M, D], with `ffn` the batched SwiGLU ([E, C, D] and the
  [E, ...] weights). `expected_rows` (default M) sizes the slots when M counts padding rows (the
  expert-parallel receive buffer). Rows past the sum of the group sizes come out zero."""
  (m, _), e = rows_MxD.shape, w_gate_ExDxF.shape[0]
  if group_sizes_E.shape != (e,):
    raise ValueError(f"group sizes {group_sizes_E.shape} must be ({e},)")
  c0, c1 = round_capacities(expected_rows or m, e, factor)
  c0 = min(c0, m)  # a group never holds more than M rows
  sizes = group_sizes_E.astype(jnp.int32)
  weights = (w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
  out = _run_round(rows_MxD, weights, sizes, _layout(sizes, m), 0, c0, ffn)
  if c0 < m:
    out = out + _spill(rows_MxD, weights, sizes, c0=c0, c1=c1, ffn=ffn)
  return out
