"""All-gather-KV context parallelism: keys and values are all-gathered over `seq`, queries stay local.

Paper: the Llama 3 Herd of Models report (context parallelism: K and V all-gathered, the
sequence split into 2n chunks, device i holding chunks i and 2n-1-i for causal load balance, which
is the `zigzag` layout here). Chosen there over ring attention because it supports any mask and
its one all-gather (of the small GQA K/V) is simple to overlap.

The gathered keys and values are attended block by block, one block per device it came from,
with the ring's block functions (`ring.block_fwd` / `block_bwd`: the float32 LSE merge, causal
sub-blocks by original index, a cuDNN flash-attention call per block with
`implementation="cudnn"`), so a long sequence never materialises a [L/n, L] score matrix and
the GPU runs fused kernels. The backward is a custom VJP like the ring's: it re-gathers K and V
(nothing gathered is kept between forward and backward), accumulates each block's dK and dV in
its slot and reduce-scatters them home.

Shapes and sharding as `ring.ring_attention`. Communication per pass: one all-gather over `axis`
of the local K, V, segment ids and indices forward; the backward gathers them again and
reduce-scatters dK and dV. Memory: the gathered K/V ([B, L, K, D] each per device) lives during
each pass only.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from parallel.attention.blockwise import F32
from parallel.attention.ring import Ring, block_bwd, block_fwd, empty_result, ring_custom_vjp, run_on_ring


def _gather(ring: Ring, k, v, segment_ids, index):
  """Every device's (k, v, segment ids, indices), stacked on a new leading axis in device order."""
  return jax.tree.map(lambda x: jax.lax.all_gather(x, ring.axis), (k, v, segment_ids, index))


def allgather_forward(ring: Ring, q, k, v, segment_ids, index) -> tuple[jax.Array, jax.Array]:
  """(float32 output, float32 LSE) of my queries against every device's keys and values."""
  def body(carry, kv):
    return block_fwd(ring, q, segment_ids, index, kv, *carry), None

  (o, lse), _ = jax.lax.scan(body, empty_result(q), _gather(ring, k, v, segment_ids, index))
  return o, lse


def allgather_backward(ring: Ring, q, k, v, segment_ids, index, o, lse, do):
  """(dq, dk, dv) in the inputs' dtypes; each block's dK and dV reduce-scattered to its device."""
  delta = jnp.sum(do.astype(F32) * o.astype(F32), axis=-1)
  zeros = lambda x: jnp.zeros_like(x, F32)

  def body(dq, kv):
    dq, dk, dv = block_bwd(ring, q, segment_ids, index, kv, o, lse, delta, do, (dq, zeros(k), zeros(v)))
    return dq, (dk, dv)

  dq, (dk_all, dv_all) = jax.lax.scan(body, zeros(q), _gather(ring, k, v, segment_ids, index))
  home = lambda x: jax.lax.psum_scatter(x, ring.axis, scatter_dimension=0)
  return dq.astype(q.dtype), home(dk_all).astype(k.dtype), home(dv_all).astype(v.dtype)


allgather_core = ring_custom_vjp(allgather_forward, allgather_backward)


def allgather_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None, *,
                        mesh: Mesh, axis: str = "seq", layout: str = "zigzag", batch_axes: Sequence[str] = (),
                        head_axes: Sequence[str] = (), implementation: str = "xla", causal: bool = True) -> jax.Array:
  """Causal (document-masked with segment ids) GQA attention, sequence split over `axis`.
  `causal=False`: every query sees every key (of its document). `implementation` as in
  `ring.ring_attention`."""
  return run_on_ring("allgather_attention", allgather_core, q, k, v, segment_ids, mesh=mesh, axis=axis,
                     layout=layout, batch_axes=batch_axes, head_axes=head_axes, implementation=implementation,
                     causal=causal)
