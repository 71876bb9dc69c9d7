"""USP, unified sequence parallelism: DeepSpeed-Ulysses inside groups of `ulysses` consecutive
`seq` devices, ring attention across the n / ulysses groups.

Paper: Fang & Zhao, "USP: A Unified Sequence Parallelism Approach for Long Context Generative
AI". Ulysses' all-to-alls stay inside a group (put it on the fast links); the ring's ppermutes
cross groups; the head count only has to divide by the Ulysses degree.

Shapes and sharding as `ring.ring_attention`, except the layout: the sequence is laid out over
the r = n / ulysses ring positions in `layout` order (`layout.permutation(layout, L, r)`), and each
group's block is split contiguously over its devices. After the group's all-to-all, each device
holds the whole group block for its share of the heads, and the ring runs over groups with
stride `ulysses` on the axis.

Communication per pass: the Ulysses all-to-alls (q, k, v, output) and a segment-id all-gather
inside each group, and r - 1 ring steps of K/V between groups (the ring's custom VJP).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
from jax.sharding import Mesh

from parallel.attention.context import check_inputs, shard_attention
from parallel.attention.ring import Ring, block_kernels, check_documents, ring_core
from parallel.attention.ulysses import heads_to_sequence, replicate_kv_heads, sequence_to_heads


def _local(q, k, v, segment_ids, index, *, ring: Ring):
  axis, n, ulysses = ring.axis, jax.lax.axis_size(ring.axis), ring.stride  # a ring position per Ulysses group
  groups = [[g * ulysses + j for j in range(ulysses)] for g in range(n // ulysses)]
  k, v = replicate_kv_heads(k, ulysses), replicate_kv_heads(v, ulysses)
  q, k, v = (heads_to_sequence(x, axis, groups) for x in (q, k, v))
  gather = lambda x, dim: jax.lax.all_gather(x, axis, axis=dim, tiled=True, axis_index_groups=groups)
  seg = None if segment_ids is None else gather(segment_ids, 1)
  return sequence_to_heads(ring_core(ring, q, k, v, seg, gather(index, 0)), axis, groups)


def usp_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None, *, mesh: Mesh,
                  ulysses: int, axis: str = "seq", layout: str = "zigzag", batch_axes: Sequence[str] = (),
                  head_axes: Sequence[str] = (), implementation: str = "xla") -> jax.Array:
  """Causal (document-masked with segment ids) GQA attention, sequence split over `axis`, with
  Ulysses degree `ulysses` (dividing the axis size) and ring degree axis size / `ulysses`."""
  n = mesh.shape[axis] if axis in mesh.shape else 0
  if ulysses < 1 or n % ulysses:
    raise ValueError(f"usp_attention: ulysses={ulysses} must divide the {n} devices of axis {axis!r}")
  check_inputs("usp_attention", q, k, v, segment_ids, mesh=mesh, axis=axis, layout=layout,
               batch_axes=batch_axes, head_axes=head_axes)
  tp = math.prod(mesh.shape[a] for a in head_axes)
  if (q.shape[2] // tp) % ulysses:
    raise ValueError(f"usp_attention: {q.shape[2] // tp} query heads per device are not divisible by "
                     f"ulysses={ulysses}")
  ring = Ring(axis=axis, size=n // ulysses, stride=ulysses, layout=layout, scale=q.shape[-1] ** -0.5,
              kernels=block_kernels(implementation))
  check_documents("usp_attention", ring, segment_ids)
  local = functools.partial(_local, ring=ring)
  return shard_attention(local, q, k, v, segment_ids, mesh=mesh, axis=axis, layout=layout,
                         batch_axes=batch_axes, head_axes=head_axes, positions=n // ulysses)
