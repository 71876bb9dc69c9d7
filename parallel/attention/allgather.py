"""All-gather-KV context parallelism: keys and values are all-gathered over `seq`, queries stay local.

Paper: the Llama 3 Herd of Models report (context parallelism: K and V all-gathered, the
sequence split into 2n chunks, device i holding chunks i and 2n-1-i for causal load balance, which
is the `zigzag` layout here). Chosen there over ring attention because it supports any mask and
its one all-gather (of the small GQA K/V) is simple to overlap.

Shapes and sharding as `ring.ring_attention`. Communication per pass: one all-gather over `axis`
of the local K, V and segment ids forward; the backward (autodiff) reduce-scatters dK and dV.
Memory: the gathered K/V ([B, L, K, D] each per device) is kept for the backward, which the ring
avoids; with GQA it is small next to the queries.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
from jax.sharding import Mesh

from parallel.attention.blockwise import attention_mask, block_forward
from parallel.attention.context import check_inputs, shard_attention


def _local(q, k, v, segment_ids, index, *, axis: str, scale: float):
  gather = lambda x, dim=1: jax.lax.all_gather(x, axis, axis=dim, tiled=True)
  k_all, v_all = gather(k), gather(v)
  seg_all = None if segment_ids is None else gather(segment_ids)
  mask = attention_mask(index, gather(index, 0), segment_ids, seg_all)
  o, _ = block_forward(q, k_all, v_all, mask, scale)
  return o.astype(q.dtype)


def allgather_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None, *,
                        mesh: Mesh, axis: str = "seq", layout: str = "zigzag", batch_axes: Sequence[str] = (),
                        head_axes: Sequence[str] = ()) -> jax.Array:
  """Causal (document-masked with segment ids) GQA attention, sequence split over `axis`."""
  check_inputs("allgather_attention", q, k, v, segment_ids, mesh=mesh, axis=axis, layout=layout,
               batch_axes=batch_axes, head_axes=head_axes)
  local = functools.partial(_local, axis=axis, scale=q.shape[-1] ** -0.5)
  return shard_attention(local, q, k, v, segment_ids, mesh=mesh, axis=axis, layout=layout,
                         batch_axes=batch_axes, head_axes=head_axes)
