"""LASP-2: sequence parallelism for linear attention with one all-gather of memory states per pass.

Paper: Sun et al., "LASP-2: Rethinking Sequence Parallelism for Linear Attention and Its Hybrid".
Each device summarises each of its spans of the sequence (a contiguous stretch of the original
order: one per device in the `contiguous` layout, two in `zigzag`) as the memory state its last
token would carry ([B, K, D, Dv], independent of length) plus the span's first and last segment
ids; one all-gather gives every device every span's summary; each device then scans the spans in
sequence order (cheap: one [D, Dv] update per span) for the state entering each of its spans,
and computes its outputs locally with the chunked op. Documents reset the state: a span's state
passes on only while its document continues.

Shapes and sharding as the softmax ops (`parallel.attention.ring`): q [B, L, H, D], k and v
[B, L, K, D], segment ids [B, L] or None (non-decreasing along a row), L split over `axis` in
`layout` order, B over `batch_axes`, heads over `head_axes`. Output float32 [B, L, H, Dv].

Communication per pass: forward, one all-gather over `axis` of [spans, B, K/t, D, Dv] float32
states (and the spans' segment ids); backward (autodiff), its transpose: one reduce-scatter.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from parallel.attention.context import check_inputs
from parallel.attention.layout import permutation
from parallel.linear.linear_attention import F32, span_attention, span_state


def spans_per_device(index_NxT) -> int:
  """The fewest equal parts that split every device's tokens into contiguous stretches of the
  original order (1 for `contiguous`, 2 for `zigzag`)."""
  t = index_NxT.shape[1]
  for parts in range(1, t + 1):
    if t % parts == 0 and all(np.all(np.diff(p) == 1) for row in index_NxT for p in np.split(row, parts)):
      return parts
  raise ValueError("lasp2_attention: the layout does not split into contiguous stretches")


def _local(q, k, v, segment_ids, decay, index, *, axis: str, spans: int, chunk: int):
  b, lq = q.shape[:2]
  span = lq // spans
  # No segment ids: one document. (Built from `index` so that it varies over `axis` like real ids.)
  seg = jnp.zeros((b, lq), jnp.int32) + 0 * index[None, :] if segment_ids is None else segment_ids
  cut = lambda x, s: x[:, s * span:(s + 1) * span]
  mine = [(cut(q, s), cut(k, s), cut(v, s), cut(seg, s)) for s in range(spans)]
  summary = {"state": jnp.stack([span_state(k_, v_, s_, decay) for _, k_, v_, s_ in mine]),
             "first": jnp.stack([s_[:, 0] for *_, s_ in mine]), "last": jnp.stack([s_[:, -1] for *_, s_ in mine]),
             "start": jnp.stack([index[s * span] for s in range(spans)])}
  every = jax.tree.map(lambda x: jax.lax.all_gather(x, axis, axis=0, tiled=True), summary)  # [n * spans, ...]
  # Order the spans as in the sequence (their first original index), then scan them for the
  # state at the end of each, continuing a document across span boundaries.
  order = jnp.argsort(every["start"])
  every = jax.tree.map(lambda x: jnp.take(x, order, axis=0), every)
  keep_all = decay ** span  # [K]: a whole span's decay

  def after(carry, x):
    state, last = carry
    through = ((x["first"] == last) & (x["first"] == x["last"])).astype(F32)[:, None, None, None]
    state = x["state"] + through * keep_all[None, :, None, None] * state
    return (state, x["last"]), (state, x["last"])

  init = (jnp.zeros_like(every["state"][0]), jnp.full_like(every["last"][0], -1))
  _, (ends, lasts) = jax.lax.scan(after, init, every)
  # Entering span g: the state after span g-1 (none before the first).
  entering = jnp.concatenate([jnp.zeros_like(ends[:1]), ends[:-1]])
  before = jnp.concatenate([jnp.full_like(lasts[:1], -1), lasts[:-1]])
  outs = []
  for s, (q_, k_, v_, s_) in enumerate(mine):
    g = jnp.sum(every["start"] < index[s * span])  # this span's place in sequence order
    outs.append(span_attention(q_, k_, v_, s_, decay, entering[g], before[g], chunk))
  return jnp.concatenate(outs, axis=1)


def lasp2_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, decay: jax.Array, *,
                    mesh: Mesh, axis: str = "seq", layout: str = "zigzag", batch_axes: Sequence[str] = (),
                    head_axes: Sequence[str] = (), chunk: int = 64, positions: int | None = None) -> jax.Array:
  """Decayed causal linear attention (see `linear_attention.py`), sequence split over `axis`.

  `decay` is float32 [K], one rate per key/value head (split over `head_axes` with the heads).
  `positions`: how many positions the layout spreads the sequence over (default the axis size;
  with USP's softmax layers, one per Ulysses group), so that LASP-2 reads the same token order.
  """
  check_inputs("lasp2_attention", q, k, v, segment_ids, mesh=mesh, axis=axis, layout=layout,
               batch_axes=batch_axes, head_axes=head_axes)
  if layout == "striped":
    raise ValueError("lasp2_attention: layout 'striped' interleaves tokens; choose zigzag or contiguous")
  n = mesh.shape[axis]
  order = permutation(layout, q.shape[1], positions or n)
  spans = spans_per_device(order.reshape(n, -1))
  index = jnp.asarray(order, jnp.int32)
  batch, heads = tuple(batch_axes) or None, tuple(head_axes) or None
  spec, seg_spec = P(batch, axis, heads, None), P(batch, axis)
  local = functools.partial(_local, axis=axis, spans=spans, chunk=chunk)
  decay = jnp.asarray(decay, F32)
  if segment_ids is None:
    fn = lambda q, k, v, decay, index: local(q, k, v, None, decay, index)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * 3 + (P(heads), P(axis)), out_specs=spec,
                         check_vma=True)(q, k, v, decay, index)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3 + (seg_spec, P(heads), P(axis)), out_specs=spec,
                       check_vma=True)(q, k, v, segment_ids, decay, index)

