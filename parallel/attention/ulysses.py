"""DeepSpeed-Ulysses: an all-to-all turns sequence-sharded q, k, v into head-sharded ones, each
device runs ordinary attention over the whole sequence for its share of the heads, and a second
all-to-all turns the output back.

Paper: Jacobs et al., "DeepSpeed Ulysses: System Optimizations for Enabling Training of Extreme
Long Sequence Transformer Models".

Shapes and sharding as `ring.ring_attention`; the local query heads (H / tensor) must divide by
the number of sequence devices n. Key/value heads fewer than n (GQA, MQA) are replicated up to
the least common multiple of their count and n first, then split, so each device's query heads
keep their own key/value head. Attention inside runs on the natural token order (the sequence
is un-permuted after the all-to-all), so any `layout` works; `contiguous` needs no reorder.

Communication per pass: forward, all-to-alls of q, k, v (after replication) and of the output,
each moving (n-1)/n of the local block, plus an all-gather of the segment ids; the backward
(autodiff) does the same all-to-alls in reverse. The volume per device stays constant when
sequence length and devices grow together.

`groups` (USP): run the all-to-alls inside consecutive groups of that many devices only.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from parallel.attention.context import check_inputs, shard_attention
from parallel.attention.dense import dot_product_attention
from parallel.attention.layout import permutation


def replicate_kv_heads(x_BxLxKxD: jax.Array, n: int) -> jax.Array:
  """Repeats each key/value head so that the head count is the lcm of K and n (divisible by n)."""
  k = x_BxLxKxD.shape[2]
  return jnp.repeat(x_BxLxKxD, math.lcm(k, n) // k, axis=2)


def heads_to_sequence(x, axis: str, groups: list[list[int]] | None):
  """[B, L/n, H, D] sequence-sharded -> [B, L, H/n, D] head-sharded (over a group if given)."""
  return jax.lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True, axis_index_groups=groups)


def sequence_to_heads(x, axis: str, groups: list[list[int]] | None):
  return jax.lax.all_to_all(x, axis, split_axis=1, concat_axis=2, tiled=True, axis_index_groups=groups)


def _local(q, k, v, segment_ids, index, *, axis: str, layout: str, implementation: str):
  del index  # attention runs on the un-permuted whole sequence
  n = jax.lax.axis_size(axis)
  k, v = replicate_kv_heads(k, n), replicate_kv_heads(v, n)
  q, k, v = (heads_to_sequence(x, axis, None) for x in (q, k, v))
  seg = None if segment_ids is None else jax.lax.all_gather(segment_ids, axis, axis=1, tiled=True)
  if layout != "contiguous":  # the gathered sequence is in device order: position j holds token order[j]
    order = permutation(layout, q.shape[1], n)
    q, k, v = (jnp.take(x, np.argsort(order), axis=1) for x in (q, k, v))
    seg = None if seg is None else jnp.take(seg, np.argsort(order), axis=1)
  o = dot_product_attention(q, k, v, seg, implementation)
  if layout != "contiguous":
    o = jnp.take(o, order, axis=1)
  return sequence_to_heads(o, axis, None)


def ulysses_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None, *,
                      mesh: Mesh, axis: str = "seq", layout: str = "contiguous", batch_axes: Sequence[str] = (),
                      head_axes: Sequence[str] = (), implementation: str = "xla") -> jax.Array:
  """Causal (document-masked with segment ids) GQA attention, sequence split over `axis`."""
  check_inputs("ulysses_attention", q, k, v, segment_ids, mesh=mesh, axis=axis, layout=layout,
               batch_axes=batch_axes, head_axes=head_axes)
  n, tp = mesh.shape[axis], math.prod(mesh.shape[a] for a in head_axes)
  if (q.shape[2] // tp) % n:
    raise ValueError(f"ulysses_attention: {q.shape[2] // tp} query heads per device (of {q.shape[2]}, over "
                     f"{tp} tensor devices) are not divisible by {n} sequence devices")
  local = functools.partial(_local, axis=axis, layout=layout, implementation=implementation)
  return shard_attention(local, q, k, v, segment_ids, mesh=mesh, axis=axis, layout=layout,
                         batch_axes=batch_axes, head_axes=head_axes)
