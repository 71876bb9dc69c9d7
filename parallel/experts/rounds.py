"""Dropless experts as dense batched matmuls in rounds of [E, C, D] slots (static shapes, exact).

Rows arrive sorted by expert (expert e's `sizes[e]` rows together). A round gathers rows into
[E, C, D] slots, runs the SwiGLU as batched matmuls (no ragged kernel), and gathers the outputs
back to their rows; rounds repeat until every row is covered, so none is dropped whatever the
routing. Local to a device: on one device, or per device after expert_parallel.py's all-to-all
(nothing is communicated here; inputs and outputs are the device's rows).

  round 0   C0 slots per expert, C0 = the mean group size x `factor`, rounded up to 128 rows:
            ordinary autodiff (its activations kept for the backward, like any matmul);
  spill     the rows past C0 of the groups that overflow, cut into chunks of C1 = C0 / 4 rows
            (each chunk one expert's), E chunks per round in [E, C1, D] slots, each with its
            expert's weights (a one-hot matmul picks them: exact, and its transpose sums the
            weight gradients per expert without scatter-adds). Only overflowing experts take
            slots. The number of rounds is data-dependent (0 under balanced routing), so they run
            in a `while_loop` with that trip count, under a custom VJP whose backward loops over
            the same rounds again, recomputing each round's forward (nothing kept per round) and
            accumulating the weight gradients in float32.

Cost: E x C0 - M padded rows in round 0 (none when M / E is a multiple of 128 and the load is
balanced); under skew, the overflow rows plus less than one chunk per overflowing expert, their
recomputation in the backward, and 3 x E weight copies per spill round. The gathers are
`permute.gather_rows`: their backward is a gather too (no scatter-adds). Rows past the sum of
the group sizes (padding) are in no slot and come out zero. Capacity slots per expert follow
GShard (Lepikhin et al. 2020); covering every row in extra rounds keeps it dropless (MegaBlocks,
Gale et al. 2023) without a grouped kernel.
"""

from __future__ import annotations

import math
from typing import NamedTuple

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


class RowMaps(NamedTuple):
  """How the M sorted rows connect to the input rows x [N, D] and the output rows [P, D], so that
  the slots gather straight from x and the outputs land straight in their rows (no [M, D] sorted
  copy either way). Dropless on one device: x the tokens, the output rows the pairs.

  src [M]: the x row of each sorted row; src_users [N, R]: the sorted rows reading each x row
  (M: none); dst [M]: the output row of each sorted row; dst_src [P]: the sorted row each output
  row reads (M: none)."""

  src: jax.Array
  src_users: jax.Array
  dst: jax.Array
  dst_src: jax.Array


def _gather_in(x_NxD, source_S, slot_M, maps: RowMaps | None) -> jax.Array:
  """[S, D] slots: slot s holds sorted row source[s] (M: empty); `slot` is its inverse (S: none)."""
  if maps is None:
    return gather_rows(x_NxD, source_S, slot_M[:, None])
  n, s = x_NxD.shape[0], source_S.shape[0]
  return gather_rows(x_NxD, jnp.append(maps.src, n)[source_S], jnp.append(slot_M, s)[maps.src_users])


def _gather_out(out_SxD, source_S, slot_M, maps: RowMaps | None) -> jax.Array:
  """The slots' outputs in the output rows (zeros for rows in no slot)."""
  if maps is None:
    return gather_rows(out_SxD, slot_M, source_S[:, None])
  s, p = out_SxD.shape[0], maps.dst_src.shape[0]
  return gather_rows(out_SxD, jnp.append(slot_M, s)[maps.dst_src], jnp.append(maps.dst, p)[source_S][:, None])


def _layout(sizes_E: jax.Array, n_rows: int):
  """(starts [E], expert of each row [M] (E for rows past the groups), position in its group [M])."""
  e = sizes_E.shape[0]
  ends = jnp.cumsum(sizes_E)
  starts = ends - sizes_E
  row = jnp.arange(n_rows, dtype=jnp.int32)
  expert = jnp.searchsorted(ends, row, side="right").astype(jnp.int32)  # E past the last group
  within = row - starts[jnp.minimum(expert, e - 1)]
  return starts, expert, within


def _first_round(rows_MxD, weights, sizes_E, layout, cap: int, ffn, maps, m: int) -> jax.Array:
  """Outputs of the rows at positions 0 .. cap - 1 of their group (zeros elsewhere): expert e's
  slots [e, :] hold its first `cap` rows."""
  d, e = rows_MxD.shape[1], sizes_E.shape[0]
  starts, expert, within = layout
  pos = jnp.arange(cap, dtype=jnp.int32)[None, :]
  source = jnp.where(pos < sizes_E[:, None], starts[:, None] + pos, m).reshape(-1)  # m: empty slot
  slot = jnp.where((expert < e) & (within < cap), expert * cap + within, e * cap)  # e * cap: none
  x = _gather_in(rows_MxD, source, slot, maps).reshape(e, cap, d)
  out = ffn(x, *weights).reshape(e * cap, d)
  return _gather_out(out, source, slot, maps)


def _spill_chunks(sizes_E, c0: int, c1: int):
  """(chunks per expert [E], first chunk of each expert [E], total chunks): the rows past C0 of
  every group cut into chunks of C1 rows, numbered expert by expert."""
  chunks = (jnp.maximum(sizes_E - c0, 0) + c1 - 1) // c1
  ends = jnp.cumsum(chunks)
  return chunks, ends - chunks, ends[-1]


def _spill_round(r, rows_MxD, weights, sizes_E, layout, maps, m: int, *, c0: int, c1: int, ffn) -> jax.Array:
  """[M, D] outputs of spill round r: chunks r*E .. r*E + E - 1, chunk s of the round in slots
  [s, :] with its expert's weights (selected by a one-hot matmul: exact, and its transpose sums
  the chunks' weight gradients per expert without a scatter-add)."""
  d, e = rows_MxD.shape[1], sizes_E.shape[0]
  starts, expert, within = layout
  chunks, first, total = _spill_chunks(sizes_E, c0, c1)
  # Slots: chunk j = r * E + s belongs to expert e_j and holds its rows from c0 + (j - first) * c1.
  j = r * e + jnp.arange(e, dtype=jnp.int32)
  e_j = jnp.clip(jnp.searchsorted(first + chunks, j, side="right"), 0, e - 1)
  pos = (c0 + (j - first[e_j]) * c1)[:, None] + jnp.arange(c1, dtype=jnp.int32)[None, :]
  valid = (j < total)[:, None] & (pos < sizes_E[e_j][:, None])
  source = jnp.where(valid, starts[e_j][:, None] + pos, m).reshape(-1)
  # Rows: a row at position p >= c0 of expert e is in chunk first[e] + (p - c0) // c1.
  ex = jnp.minimum(expert, e - 1)
  chunk = first[ex] + (within - c0) // c1
  inside = (expert < e) & (within >= c0) & (chunk // e == r)
  slot = jnp.where(inside, (chunk - r * e) * c1 + (within - c0) % c1, e * c1)
  one_hot = jax.nn.one_hot(jnp.where(j < total, e_j, e), e, dtype=rows_MxD.dtype)
  x = _gather_in(rows_MxD, source, slot, maps).reshape(e, c1, d)
  out = ffn(x, *(jnp.einsum("se,e...->s...", one_hot, w) for w in weights)).reshape(e * c1, d)
  return _gather_out(out, source, slot, maps)


def _spill(base, rows_MxD, weights, sizes_E, maps, m: int, *, c0: int, c1: int, ffn):
  """base + the outputs of the rows past C0 of every group, in data-dependent rounds of E chunks
  of C1 rows (custom VJP: the backward recomputes each round rather than keeping anything per
  round). Adding into `base` (round 0's outputs) costs nothing when no round runs."""
  n_experts = sizes_E.shape[0]

  def count(sizes):
    return (_spill_chunks(sizes, c0, c1)[2] + n_experts - 1) // n_experts

  def one(r, rows, ws, ints):
    sizes, maps = ints
    return _spill_round(r, rows, ws, sizes, _layout(sizes, m), maps, m, c0=c0, c1=c1, ffn=ffn)

  @jax.custom_vjp
  def spill(base, rows, ws, ints):
    return jax.lax.fori_loop(0, count(ints[0]), lambda r, acc: acc + one(r, rows, ws, ints), base)

  def fwd(base, rows, ws, ints):
    return spill(base, rows, ws, ints), (rows, ws, ints)

  def bwd(res, d_out):
    rows, ws, ints = res

    def body(r, acc):
      _, vjp = jax.vjp(lambda x, *w: one(r, x, w, ints), rows, *ws)
      g = vjp(d_out)
      return tuple(a + b.astype(jnp.float32) for a, b in zip(acc, g))

    # zeros_like keeps the manual axes the inputs vary over (a loop carry inside `shard_map` must
    # keep its type); float32 sums (an input row read by K pairs may meet several rounds).
    init = tuple(jnp.zeros_like(a, jnp.float32) for a in (rows, *ws))
    grads = jax.lax.fori_loop(0, count(ints[0]), body, init)
    return d_out, grads[0].astype(rows.dtype), tuple(g.astype(w.dtype) for g, w in zip(grads[1:], ws)), None

  spill.defvjp(fwd, bwd)
  return spill(base, rows_MxD, tuple(weights), (sizes_E, maps))


def rounds_ffn(rows_MxD: jax.Array, group_sizes_E: jax.Array, w_gate_ExDxF: jax.Array, w_up_ExDxF: jax.Array,
               w_down_ExFxD: jax.Array, ffn, *, expected_rows: int | None = None,
               factor: float = CAPACITY_FACTOR, maps: RowMaps | None = None) -> jax.Array:
  """[M, D] rows sorted by expert -> [M, D], with `ffn` the batched SwiGLU ([E, C, D] and the
  [E, ...] weights). `expected_rows` (default M) sizes the slots when M counts padding rows (the
  expert-parallel receive buffer). Rows past the sum of the group sizes come out zero.
  With `maps`, rows_MxD is the input x [N, D] that the sorted rows read and the result is [P, D]
  in the output rows (see RowMaps)."""
  e = w_gate_ExDxF.shape[0]
  m = rows_MxD.shape[0] if maps is None else maps.src.shape[0]
  if group_sizes_E.shape != (e,):
    raise ValueError(f"group sizes {group_sizes_E.shape} must be ({e},)")
  c0, c1 = round_capacities(expected_rows or m, e, factor)
  c0 = min(c0, m)  # a group never holds more than M rows
  sizes = group_sizes_E.astype(jnp.int32)
  weights = (w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
  out = _first_round(rows_MxD, weights, sizes, _layout(sizes, m), c0, ffn, maps, m)
  if c0 < m:
    out = _spill(out, rows_MxD, weights, sizes, maps, m, c0=c0, c1=c1, ffn=ffn)
  return out
