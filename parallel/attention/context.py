"""What every context-parallel attention op shares: input checks and the `shard_map` around it.

An op sees q [B, L, H, D], k and v [B, L, K, D] and segment ids [B, L] (or None) laid out with
the batch split over `batch_axes`, the (permuted, see `layout.py`) sequence over the `seq` axis and
the heads over `head_axes` (tensor parallelism). Inside, each device holds [B/b, L/n, H/t, D],
plus `index` [L/n]: the original position of each of its tokens, which the causal mask needs and
which travels with blocks that travel. The local function communicates over `seq` only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
from jax.sharding import Mesh, PartitionSpec as P

import jax.numpy as jnp

from parallel.attention.layout import check_layout, permutation


def check_inputs(name: str, q, k, v, segment_ids, *, mesh: Mesh, axis: str, layout: str,
                 batch_axes: Sequence[str], head_axes: Sequence[str]) -> None:
  """Raises ValueError naming what does not fit (shapes, GQA, divisibility over the mesh)."""
  if axis not in mesh.shape:
    raise ValueError(f"{name}: axis={axis!r} is not a mesh axis (mesh axes: {tuple(mesh.shape)})")
  if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
    raise ValueError(f"{name}: expected q [B, L, H, D] and k, v [B, L, K, D]; got {q.shape}, {k.shape}, {v.shape}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"{name}: {q.shape[2]} query heads are not a multiple of {k.shape[2]} key/value heads")
  if segment_ids is not None and segment_ids.shape != q.shape[:2]:
    raise ValueError(f"{name}: segment ids must be [B, L] = {q.shape[:2]}, got {segment_ids.shape}")
  check_layout(layout, q.shape[1], mesh.shape[axis])
  rows = math.prod(mesh.shape[a] for a in batch_axes)
  if q.shape[0] % rows:
    raise ValueError(f"{name}: batch {q.shape[0]} is not divisible by the batch axes {tuple(batch_axes)} ({rows})")
  heads = math.prod(mesh.shape[a] for a in head_axes)
  if k.shape[2] % heads:
    raise ValueError(f"{name}: {k.shape[2]} key/value heads are not divisible by the head axes "
                     f"{tuple(head_axes)} ({heads})")


def shard_attention(local: Callable, q, k, v, segment_ids, *, mesh: Mesh, axis: str, layout: str,
                    batch_axes: Sequence[str], head_axes: Sequence[str], positions: int | None = None) -> jax.Array:
  """Runs `local(q, k, v, segment_ids, index)` on each device's blocks; segment ids may be None.

  `positions`: how many positions the layout spreads the sequence over (default: the axis size;
  USP: one per Ulysses group, each group's block split contiguously over its devices).
  """
  batch, heads = tuple(batch_axes) or None, tuple(head_axes) or None
  spec, seg_spec = P(batch, axis, heads, None), P(batch, axis)
  index = jnp.asarray(permutation(layout, q.shape[1], positions or mesh.shape[axis]), jnp.int32)
  if segment_ids is None:
    fn = lambda q, k, v, index: local(q, k, v, None, index)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * 3 + (P(axis),), out_specs=spec,
                         check_vma=True)(q, k, v, index)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3 + (seg_spec, P(axis)), out_specs=spec,
                       check_vma=True)(q, k, v, segment_ids, index)
