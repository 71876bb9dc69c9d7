"""Shared by the context-parallel attention tests: inputs with packed documents, the mesh layouts,
and the check of an op (run on the permuted, sharded sequence) against dense attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from parallel.attention.layout import permutation
from parallel.mesh import make_mesh
from tests.parallel.test_attention import _reference
from tests.reference import check_against_reference

# name -> (mesh sizes, batch axes, head axes). Every case has 6 or 12 tokens per device: not a
# power of two, and even (zigzag needs two chunks per device).
MESHES = {
    "seq8": ({"seq": 8}, (), ()),
    "data2_seq4": ({"data": 2, "seq": 4}, ("data",), ()),
    "data2_seq2_tensor2": ({"data": 2, "seq": 2, "tensor": 2}, ("data",), ("tensor",)),
}


def inputs(length: int, heads: int, kv_heads: int, dtype=jnp.float32, batch: int = 2, dim: int = 8, seed: int = 0):
  """q, k, v in natural order and segment ids of packed documents (row 0: three documents of
  uneven length; row 1: one document), plus the sequence length."""
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (batch, length, heads, dim)).astype(dtype)
  k = jax.random.normal(ks[1], (batch, length, kv_heads, dim)).astype(dtype)
  v = jax.random.normal(ks[2], (batch, length, kv_heads, dim)).astype(dtype)
  cuts = [length // 5, length // 5 + length // 2]
  row0 = np.searchsorted(cuts, np.arange(length), side="right") + 1
  seg = jnp.asarray(np.stack([row0] + [np.ones(length, int)] * (batch - 1)), jnp.int32)
  return q, k, v, seg


def check_context_op(op, mesh_name: str, layout: str, *, length: int, heads: int = 4, kv_heads: int = 2,
                     dtype=jnp.float32, segments: bool = True, ring_divisor: int = 1, **op_kwargs) -> None:
  """`op` on the sequence permuted into `layout` and split over `seq`, un-permuted, against dense
  causal attention of the natural order: outputs and gradients of q, k, v. The layout runs over
  the `seq` size / `ring_divisor` positions (USP: one position per Ulysses group)."""
  sizes, batch_axes, head_axes = MESHES[mesh_name]
  mesh = make_mesh(sizes, jax.devices()[:int(np.prod(list(sizes.values())))])
  n = mesh.shape["seq"]
  q, k, v, seg = inputs(length, heads, kv_heads, dtype)
  perm = permutation(layout, length, n // ring_divisor)
  inverse = np.argsort(perm)
  seg_p = seg[:, perm] if segments else None

  def parallel(q, k, v):
    out = op(q[:, perm], k[:, perm], v[:, perm], seg_p, mesh=mesh, axis="seq", layout=layout,
             batch_axes=batch_axes, head_axes=head_axes, **op_kwargs)
    return out[:, inverse]

  dense_seg = seg if segments else jnp.ones_like(seg)
  check_against_reference(parallel, lambda q, k, v: _reference(q, k, v, dense_seg), (q, k, v), dtype=dtype)
