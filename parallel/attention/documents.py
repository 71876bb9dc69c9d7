"""Packed documents on fused attention kernels: a ring's blocks when segment ids are given.

A fused kernel takes no per-token mask, but packing makes every document a run of the sequence
(segment ids number the documents in order, as `data/packing.py` writes them), and each device
holds its tokens in increasing original order in every layout, so within any block a document is
a run of query rows and a run of keys. Under causal masking with the zigzag or contiguous layout a
ring meets two kinds of block:

  earlier  every key comes before every query (another position's block). Only the document
           running across the gap can be on both sides: the queries' first rows and the keys'
           last. One padding-masked kernel call computes it, with the keys rolled so that this
           document's keys come first: the first `p` rows against the first `s` keys.
  own      the queries' own keys, causal in local order. One packed-segment call (cuDNN's "THD"
           layout, equal query and key offsets: causal within each document) when every row's
           documents fit `packed_slots`, which keeps the call's backward workspace (about
           8 x L x H x D bytes per slot) under `PACKED_WORKSPACE`. Otherwise the block splits
           into pieces that each take `MAX_DOCUMENTS` slots, each one packed call when its
           documents fit, else tiles of `TILE` rows (one causal call for a tile of one document,
           masked XLA otherwise). The document running into a piece or tile from before it adds
           one padding-masked call, as for an earlier block.

Rows and keys outside a call's document are masked out of its results here (the kernel leaves
them undefined), so results equal the masked XLA blocks' to rounding, and no score matrix larger
than a tile's exists. `kernels` is `cudnn_blocks` on GPUs, or its XLA twins `xla_kernels` (which
run these routes on CPUs, for the tests).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from parallel.attention.blockwise import F32, NEG, attention_mask, block_backward, block_forward, merge
from parallel.attention.layout import permutation

MAX_DOCUMENTS = 64  # at most this many documents per own block take one packed-segment call
PACKED_WORKSPACE = 8 << 30  # bytes: the packed call's backward needs about 8 x L x H x D per slot
TILE = 1024  # rows per tile of an own block otherwise (rounded so that tiles divide the block)


def check_document_order(name: str, segment_ids, layout: str, positions: int) -> None:
  """Raises ValueError when concrete segment ids ([B, L], laid out in `layout` over `positions`)
  do not number the documents in order along the original sequence, as this route needs. (Inside
  `jit` they are not known; packing always writes them in order.)"""
  if segment_ids is None or isinstance(segment_ids, jax.core.Tracer):
    return
  seg = np.asarray(segment_ids)[:, np.argsort(permutation(layout, segment_ids.shape[1], positions))]
  if np.any(np.diff(seg, axis=1) < 0):
    raise ValueError(f"{name}: fused kernels with segment ids need them non-decreasing along the sequence "
                     f"(documents numbered in order, as packing writes them); use implementation='xla' otherwise")


def tiles(length: int, tile: int) -> int:
  """How many equal tiles of at most `tile` rows (where a divisor allows) cut `length` rows."""
  n = math.ceil(length / tile)
  while length % n:
    n += 1
  return n


def _roll(x: jax.Array, start: jax.Array) -> jax.Array:
  """x [B, L, ...] with row j of batch row b taken from row (j + start[b]) % L."""
  length = x.shape[1]
  idx = (jnp.arange(length)[None, :] + start[:, None]) % length
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _first(x: jax.Array, n: jax.Array) -> jax.Array:
  """[B, L] bool: position < n[b]."""
  return jnp.arange(x.shape[1])[None, :] < n[:, None]


def _keep(x: jax.Array, where_BxL: jax.Array, fill: float = 0.0) -> jax.Array:
  return jnp.where(where_BxL.reshape(where_BxL.shape + (1,) * (x.ndim - 2)), x.astype(F32), fill)


def span_forward(kernels, q, k, v, span, scale):
  """Float32 (output, LSE) of q's first p rows against keys [start, start + s) per batch row
  (`span` = (p, start, s), each [B]); other rows get nothing (zero output, LSE `NEG`)."""
  p, start, s = span
  o, lse = kernels.padded_forward(q, _roll(k, start), _roll(v, start), p, s, scale)
  rows = _first(q, p)
  return _keep(o, rows), _keep(lse, rows, NEG)


def span_backward(kernels, q, k, v, span, scale, o, lse, do):
  """Float32 (dq, dk, dv) of `span_forward`'s share given the rows' final output and LSE."""
  p, start, s = span
  dq, dk, dv = kernels.padded_backward(q, _roll(k, start), _roll(v, start), p, s, scale, o, lse, do)
  keys = _first(k, s)
  return _keep(dq, _first(q, p)), _roll(_keep(dk, keys), -start), _roll(_keep(dv, keys), -start)


def earlier_span(q_seg: jax.Array, kv_seg: jax.Array):
  """(p, start, s) of the one document shared by queries and the keys that all precede them."""
  doc = q_seg[:, 0]
  shared = kv_seg[:, -1] == doc
  p = jnp.where(shared, jnp.sum(q_seg == doc[:, None], axis=1), 0)
  start = jnp.where(shared, jnp.sum(kv_seg < doc[:, None], axis=1), 0)
  return p, start, jnp.where(shared, kv_seg.shape[1] - start, 0)


def earlier_forward(kernels, q, k, v, q_seg, kv_seg, scale):
  """Float32 (output, LSE) of queries against keys that all precede them (document-masked)."""
  return span_forward(kernels, q, k, v, earlier_span(q_seg, kv_seg), scale)


def earlier_backward(kernels, q, k, v, q_seg, kv_seg, scale, o, lse, do):
  """Float32 (dq, dk, dv) of `earlier_forward`'s share."""
  return span_backward(kernels, q, k, v, earlier_span(q_seg, kv_seg), scale, o, lse, do)


def _tile_span(seg, row0, t):
  """(p, start, s) of the document running into the tile at `row0` from the rows before it."""
  doc = seg[:, row0]
  start = jnp.sum(seg < doc[:, None], axis=1)
  s = row0 - start
  rows = jnp.sum(jax.lax.dynamic_slice_in_dim(seg, row0, t, axis=1) == doc[:, None], axis=1)
  return jnp.where(s > 0, rows, 0), start, s


def _by_tile(x, n):
  """[B, n*t, ...] -> [n, B, t, ...]: one slice per tile, for `lax.map`."""
  return x.reshape(x.shape[0], n, x.shape[1] // n, *x.shape[2:]).swapaxes(0, 1)


def _from_tiles(x):
  return x.swapaxes(0, 1).reshape(x.shape[1], -1, *x.shape[3:])


def _one_document(seg_t):
  """Whether every batch row of a tile holds one document (non-decreasing ids: first == last)."""
  return jnp.all(seg_t[:, 0] == seg_t[:, -1])


def _tile_mask(seg_t):
  idx = jnp.arange(seg_t.shape[1])
  return attention_mask(idx, idx, seg_t, seg_t)


def block_documents(seg: jax.Array, slots: int):
  """The documents of each row of an own block (`seg` [B, L] non-decreasing) as `slots` packed
  segments: ([B, slots] lengths, [B, slots] starts; unused slots have both 0), and whether every
  row's documents fit."""
  b, length = seg.shape
  first = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  count = jnp.sum(first, axis=1)
  starts = jax.vmap(lambda f: jnp.nonzero(f, size=slots, fill_value=0)[0])(first).astype(jnp.int32)
  slot = jnp.arange(slots)[None, :]
  ends = jnp.where(slot + 1 < count[:, None], jnp.roll(starts, -1, axis=1), length)
  lengths = jnp.where(slot < count[:, None], ends - starts, 0)
  return lengths, jnp.where(slot < count[:, None], starts, 0), jnp.all(count <= slots)


def packed_slots(q_shape) -> int:
  """How many documents per row an own block of queries [B, L, H, D] takes in one packed call:
  `MAX_DOCUMENTS`, fewer where the backward's workspace would pass `PACKED_WORKSPACE`."""
  b, length, heads, dim = q_shape
  return min(MAX_DOCUMENTS, PACKED_WORKSPACE // (8 * b * length * heads * dim))


def _piece_length(q_shape, tile: int) -> int:
  """Rows per piece when an own block's documents do not fit one packed call: as many as
  `MAX_DOCUMENTS` slots allow within `PACKED_WORKSPACE`, at most half the block; 0 when that is no
  more than `tile` (tiles then)."""
  b, length, heads, dim = q_shape
  if not MAX_DOCUMENTS:
    return 0
  cap = PACKED_WORKSPACE // (8 * b * heads * dim * MAX_DOCUMENTS)
  piece = length // tiles(length, max(1, min(cap, length // 2)))
  return piece if piece > tile else 0


def _packed_or(q_shape, seg, packed, fallback):
  """`packed(lengths, starts)` (one packed call) when every row's documents fit `packed_slots`,
  else `fallback()`."""
  slots = packed_slots(q_shape)
  if not slots:
    return fallback()
  lengths, starts, fits = block_documents(seg, slots)
  return jax.lax.cond(fits, lambda: packed(lengths, starts), fallback)


def own_forward(kernels, q, k, v, seg, scale, tile: int | None = None):
  """Float32 (output, LSE) of a block's queries against its own keys: causal in local order and
  document-masked (`seg` [B, L] non-decreasing). Up to `packed_slots` documents per row: one
  packed-segment kernel call. More: pieces (`_piece_length`), each one packed call when its
  documents fit, else tiles of `tile` rows (default `TILE`); the document running into a piece
  or tile from before it adds one padding-masked call."""
  tile = tile or TILE
  diagonal = _diagonal_forward(kernels, scale)
  tiled = lambda q, k, v, seg: _tiled_forward(kernels, q, k, v, seg, scale, tiles(q.shape[1], tile), diagonal)

  def packed_or(q, k, v, seg, fallback):
    packed = lambda lengths, starts: tuple(
        x.astype(F32) for x in kernels.documents_forward(q, k, v, lengths, starts, scale))
    return _packed_or(q.shape, seg, packed, fallback)

  piece = _piece_length(q.shape, tile)
  if not piece:
    return packed_or(q, k, v, seg, lambda: tiled(q, k, v, seg))
  per_piece = lambda a: packed_or(*a, lambda: tiled(*a))
  return packed_or(q, k, v, seg,
                   lambda: _tiled_forward(kernels, q, k, v, seg, scale, q.shape[1] // piece, per_piece))


def own_backward(kernels, q, k, v, seg, scale, o, lse, do, tile: int | None = None):
  """Float32 (dq, dk, dv) of `own_forward` given the rows' final output and LSE."""
  tile = tile or TILE
  diagonal = _diagonal_backward(kernels, scale)
  tiled = lambda q, k, v, seg, o, lse, do: _tiled_backward(kernels, q, k, v, seg, scale, o, lse, do,
                                                           tiles(q.shape[1], tile), diagonal)

  def packed_or(q, k, v, seg, o, lse, do, fallback):
    packed = lambda lengths, starts: kernels.documents_backward(q, k, v, lengths, starts, scale, o, lse, do)
    return _packed_or(q.shape, seg, packed, fallback)

  piece = _piece_length(q.shape, tile)
  if not piece:
    return packed_or(q, k, v, seg, o, lse, do, lambda: tiled(q, k, v, seg, o, lse, do))
  per_piece = lambda a: packed_or(*a, lambda: tiled(*a))
  return packed_or(q, k, v, seg, o, lse, do,
                   lambda: _tiled_backward(kernels, q, k, v, seg, scale, o, lse, do, q.shape[1] // piece, per_piece))


def _diagonal_forward(kernels, scale):
  """A tile's own rows and keys: one causal kernel call when it holds one document, else XLA."""
  def diagonal(a):
    q_, k_, v_, seg_ = a
    fused = lambda: tuple(x.astype(F32) for x in kernels.block_forward(q_, k_, v_, True, scale))
    return jax.lax.cond(_one_document(seg_), fused, lambda: block_forward(q_, k_, v_, _tile_mask(seg_), scale))
  return diagonal


def _diagonal_backward(kernels, scale):
  def diagonal(a):
    q_, k_, v_, seg_, o_, lse_, do_ = a
    fused = lambda: kernels.block_backward(q_, k_, v_, True, scale, o_, lse_, do_)
    delta = jnp.sum(do_.astype(F32) * o_.astype(F32), axis=-1)
    xla = lambda: block_backward(q_, k_, v_, _tile_mask(seg_), scale, lse_, delta, do_)
    return jax.lax.cond(_one_document(seg_), fused, xla)
  return diagonal


def _tiled_forward(kernels, q, k, v, seg, scale, n, diagonal):
  """`diagonal` on each of n tiles' own rows and keys, then each tile's rows against the document
  running into it from before."""
  t = q.shape[1] // n
  o, lse = (_from_tiles(x) for x in jax.lax.map(diagonal, tuple(_by_tile(x, n) for x in (q, k, v, seg))))

  def step(carry, i):
    o, lse = carry
    row0 = i * t
    rows = lambda x: jax.lax.dynamic_slice_in_dim(x, row0, t, axis=1)
    ob, lb = span_forward(kernels, rows(q), k, v, _tile_span(seg, row0, t), scale)
    om, lm = merge(rows(o), rows(lse), ob, lb)
    put = lambda x, y: jax.lax.dynamic_update_slice_in_dim(x, y, row0, axis=1)
    return (put(o, om), put(lse, lm)), None

  (o, lse), _ = jax.lax.scan(step, (o, lse), jnp.arange(1, n))
  return o, lse


def _tiled_backward(kernels, q, k, v, seg, scale, o, lse, do, n, diagonal):
  t = q.shape[1] // n
  grads = jax.lax.map(diagonal, tuple(_by_tile(x, n) for x in (q, k, v, seg, o, lse, do)))
  dq, dk, dv = (_from_tiles(x) for x in grads)

  def step(carry, i):
    dq, dk, dv = carry
    row0 = i * t
    rows = lambda x: jax.lax.dynamic_slice_in_dim(x, row0, t, axis=1)
    bq, bk, bv = span_backward(kernels, rows(q), k, v, _tile_span(seg, row0, t), scale, rows(o), rows(lse),
                               rows(do))
    dq = jax.lax.dynamic_update_slice_in_dim(dq, rows(dq) + bq, row0, axis=1)
    return (dq, dk + bk, dv + bv), None

  (dq, dk, dv), _ = jax.lax.scan(step, (dq, dk, dv), jnp.arange(1, n))
  return dq, dk, dv
