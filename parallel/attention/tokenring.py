"""TokenRing: queries travel around the `seq` devices while keys and values stay home; each
partial output and its log-sum-exp go straight back to the queries' owner, so both directions of
every link are busy at once.

Paper: Wang et al., "TokenRing: An Efficient Parallelism Framework for Infinite-Context LLMs via
Bidirectional Communication". The paper's public code has only the forward pass; the backward
here mirrors it: queries, their output gradients and row statistics travel forward, the
keys' and values' gradients accumulate where the keys and values live, and each partial query
gradient goes back to its owner.

Shapes and sharding as `ring.ring_attention`: q [B, L, H, D], k and v [B, L, K, D], segment ids
[B, L] or None, L split over `axis` in `layout` order.

Communication per device and step (n steps): forward, one `ppermute` of a query block (+ segment
ids) to the next device and one of a float32 partial output + LSE to the owner, s devices back;
backward, the query block with its output gradient and statistics forward, and a float32 partial
query gradient back. With `zigzag` every step does the same work on every device (as in ring
attention, with the roles of queries and keys swapped).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from parallel.attention.blockwise import F32, merge
from parallel.attention.ring import Ring, block_bwd, block_fwd, empty_result, ring_custom_vjp, run_on_ring


def _back(n: int, s: jax.Array | int) -> list[tuple[int, int]]:
  """ppermute pairs returning a result computed s devices ahead to the device it belongs to."""
  return [(d, (d - s) % n) for d in range(n)]


def _forward(ring: Ring, q, k, v, segment_ids, index):
  n = ring.size
  kv = (k, v, segment_ids, index)
  o, lse = empty_result(q)
  travelling = (q, segment_ids, index)
  for s in range(n):  # static: the return distance `s` is part of each step's permutation
    arriving = jax.lax.ppermute(travelling, ring.axis, ring.shift(n)) if s < n - 1 else None
    # The visitor's partial result: merged into an empty one (its owner merges it into the rest).
    ob, lb = block_fwd(ring, *travelling, kv, *empty_result(travelling[0]))
    ob, lb = jax.lax.ppermute((ob, lb), ring.axis, _back(n, s)) if s else (ob, lb)
    o, lse = merge(o, lse, ob, lb)
    travelling = arriving
  return o, lse


def _backward(ring: Ring, q, k, v, segment_ids, index, o, lse, do):
  n = ring.size
  kv = (k, v, segment_ids, index)
  delta = jnp.sum(do.astype(F32) * o.astype(F32), axis=-1)
  zeros = lambda x: jnp.zeros_like(x, F32)
  dq, dk, dv = zeros(q), zeros(k), zeros(v)
  # The output travels too, for fused kernels (whose backward recomputes delta from it).
  travelling = (q, segment_ids, index, o if ring.fused else None, lse, delta, do)
  for s in range(n):
    arriving = jax.lax.ppermute(travelling, ring.axis, ring.shift(n)) if s < n - 1 else None
    vq, vseg, vindex, vo, vlse, vdelta, vdo = travelling
    # The visitor's query gradient starts from zero and goes home; dK, dV accumulate here.
    bq, dk, dv = block_bwd(ring, vq, vseg, vindex, kv, vo, vlse, vdelta, vdo, (zeros(vq), dk, dv))
    dq = dq + (jax.lax.ppermute(bq, ring.axis, _back(n, s)) if s else bq)
    travelling = arriving
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


# Local TokenRing attention inside `shard_map` (`index` as in `ring.ring_core`).
tokenring_core = ring_custom_vjp(_forward, _backward)


def tokenring_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None, *,
                        mesh: Mesh, axis: str = "seq", layout: str = "zigzag", batch_axes: Sequence[str] = (),
                        head_axes: Sequence[str] = (), implementation: str = "xla") -> jax.Array:
  """Causal (document-masked with segment ids) GQA attention, sequence split over `axis`;
  `implementation` as in `ring.ring_attention`."""
  return run_on_ring("tokenring_attention", tokenring_core, q, k, v, segment_ids, mesh=mesh, axis=axis,
                     layout=layout, batch_axes=batch_axes, head_axes=head_axes, implementation=implementation)
