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
            slots. A round gathers its slots' input rows and scatters its outputs into their
            rows (each written once: unique indices), so it costs its slots, not the M rows. The
            number of rounds is data-dependent (0 under balanced routing), so they run in a
            `while_loop` with that trip count, under a custom VJP whose backward loops over the
            same rounds again, recomputing each round's forward (nothing kept per round),
            accumulating the weight gradients in float32, and is skipped (a `cond`) when no
            round ran.

Cost: E x C0 - M padded rows in round 0 (none when M / E is a multiple of 128 and the load is
balanced); under skew, the overflow rows plus less than one chunk per overflowing expert, their
recomputation in the backward, and 3 x E weight copies per spill round. Round 0's gathers are
`permute.gather_rows`: their backward is a gather too (no scatter-adds); the spill's backward
writes each slot's input gradient to its sorted row and sums them into the input rows once. Rows past the sum of
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


class _Round(NamedTuple):
  """Spill round r's slots: chunk s of the round belongs to expert `expert[s]` (E: no chunk), and
  slot i (chunk i // C1) holds sorted row `row[i]`, reads input row `src[i]` and writes output row
  `dst[i]` (M, the input row count and the output row count mean none)."""

  expert: jax.Array
  row: jax.Array
  src: jax.Array
  dst: jax.Array


def _round_slots(r, sizes_E, maps: RowMaps | None, m: int, n_in: int, n_out: int, *, c0: int, c1: int) -> _Round:
  """Chunks r*E .. r*E + E - 1 in slots [s, :]: chunk j belongs to expert e_j and holds its rows
  from c0 + (j - first[e_j]) * c1."""
  e = sizes_E.shape[0]
  starts = jnp.cumsum(sizes_E) - sizes_E
  chunks, first, total = _spill_chunks(sizes_E, c0, c1)
  j = r * e + jnp.arange(e, dtype=jnp.int32)
  e_j = jnp.clip(jnp.searchsorted(first + chunks, j, side="right"), 0, e - 1)
  pos = (c0 + (j - first[e_j]) * c1)[:, None] + jnp.arange(c1, dtype=jnp.int32)[None, :]
  valid = (j < total)[:, None] & (pos < sizes_E[e_j][:, None])
  row = jnp.where(valid, starts[e_j][:, None] + pos, m).reshape(-1)
  if maps is None:
    src = dst = row
  else:
    src, dst = jnp.append(maps.src, n_in)[row], jnp.append(maps.dst, n_out)[row]
  return _Round(jnp.where(j < total, e_j, e), row, src, dst)


def _spill(base, rows_MxD, weights, sizes_E, maps, m: int, *, c0: int, c1: int, ffn):
  """base + the outputs of the rows past C0 of every group, in data-dependent rounds of E chunks
  of C1 rows. Each round reads and writes only its slots' rows: its inputs are gathered from the
  input rows, its outputs scattered into their output rows (each output row is written by one
  slot of one round, so the indices are unique and nothing is added twice). Custom VJP: the
  backward recomputes each round (nothing is kept per round), writes the slots' input gradients
  into a per-sorted-row buffer (again one slot each) and sums them into the input rows once at the
  end, and accumulates the weight gradients in float32; with no spill round (balanced routing) it
  is skipped whole."""
  n_experts, d = sizes_E.shape[0], rows_MxD.shape[1]
  n_in, n_out = rows_MxD.shape[0], base.shape[0]

  def count(sizes):
    return (_spill_chunks(sizes, c0, c1)[2] + n_experts - 1) // n_experts

  def round_inputs(r, rows, ints):
    sizes, maps = ints
    slots = _round_slots(r, sizes, maps, m, n_in, n_out, c0=c0, c1=c1)
    one_hot = jax.nn.one_hot(slots.expert, n_experts, dtype=rows.dtype)
    return slots, one_hot, rows.at[slots.src].get(mode="fill", fill_value=0).reshape(n_experts, c1, d)

  @jax.custom_vjp
  def spill(base, rows, ws, ints):
    def body(r, acc):
      slots, one_hot, x = round_inputs(r, rows, ints)
      out = ffn(x, *(jnp.einsum("se,e...->s...", one_hot, w) for w in ws)).reshape(n_experts * c1, d).astype(acc.dtype)
      return acc.at[slots.dst].add(out, mode="drop", unique_indices=True)
    return jax.lax.fori_loop(0, count(ints[0]), body, base)

  def fwd(base, rows, ws, ints):
    return spill(base, rows, ws, ints), (rows, ws, ints)

  def bwd(res, d_out):
    rows, ws, ints = res
    n_rounds = count(ints[0])

    def body(r, acc):
      d_sorted, d_ws = acc
      slots, one_hot, x = round_inputs(r, rows, ints)
      # The selection's transpose sums each chunk's weight gradients into its expert's (and, inside
      # `shard_map`, over the axes the weights are replicated on, as autodiff types it).
      selected, select_vjp = jax.vjp(lambda *w: tuple(jnp.einsum("se,e...->s...", one_hot, a) for a in w), *ws)
      _, vjp = jax.vjp(ffn, x, *selected)
      d_x, *d_selected = vjp(d_out.at[slots.dst].get(mode="fill", fill_value=0).reshape(x.shape).astype(x.dtype))
      d_sorted = d_sorted.at[slots.row].set(d_x.reshape(-1, d).astype(d_sorted.dtype), mode="drop",
                                            unique_indices=True)
      d_ws = tuple(a + g.astype(jnp.float32) for a, g in zip(d_ws, select_vjp(tuple(d_selected))))
      return d_sorted, d_ws

    def run(_):
      # zeros_like keeps the manual axes the inputs vary over (a loop carry inside `shard_map` must
      # keep its type). A sorted row is in one slot of one round, so its buffer is written once.
      init = (jnp.zeros_like(rows, shape=(m, d)), tuple(jnp.zeros_like(w, jnp.float32) for w in ws))
      d_sorted, d_ws = jax.lax.fori_loop(0, n_rounds, body, init)
      maps = ints[1]
      if maps is not None:  # input row n's gradient: the sum over the sorted rows that read it
        d_sorted = jnp.sum(d_sorted.at[maps.src_users].get(mode="fill", fill_value=0).astype(jnp.float32),
                           axis=1).astype(rows.dtype)
      return d_sorted, tuple(g.astype(w.dtype) for g, w in zip(d_ws, ws))

    def skip(_):
      return jnp.zeros_like(rows), tuple(jnp.zeros_like(w) for w in ws)

    d_rows, d_ws = jax.lax.cond(n_rounds > 0, run, skip, None)
    return d_out, d_rows, d_ws, None

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
