"""Vocabulary-parallel embedding lookup and cross-entropy (Megatron-LM, Shoeybi et al. 2019).

The vocabulary is split into contiguous slices over one mesh axis (`tensor`). Each device looks up
or scores only its slice; the results are combined with all-reduces of [batch, length] statistics,
so the full-vocabulary logits are never gathered on one device.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P


def _slice_start(axis: str, local_size: int) -> jax.Array:
  return jax.lax.axis_index(axis) * local_size


def _pick(logits_BxLxV: jax.Array, index_BxL: jax.Array) -> jax.Array:
  """logits[b, l, index[b, l]] as a masked sum over the vocabulary (exact: the rest adds zeros).

  Its gradient is a select, which XLA fuses with the softmax's into one pass that writes the
  logits' gradient in their own dtype; `take_along_axis` would scatter into a float32 buffer the
  size of the logits instead.
  """
  vocab = jax.lax.broadcasted_iota(index_BxL.dtype, logits_BxLxV.shape, logits_BxLxV.ndim - 1)
  return jnp.sum(jnp.where(vocab == index_BxL[..., None], logits_BxLxV, 0.0), axis=-1)


def vocab_parallel_embed(table_VxD: jax.Array, ids_BxL: jax.Array, *, mesh: Mesh, axis: str = "tensor",
                         batch_axes: Sequence[str] = (), scatter_length: bool = False) -> jax.Array:
  """Embedding lookup with the table split on vocab over `axis`.

  Args:
    table_VxD: [V, D], sharded P(axis, None) (other shardings are resharded on entry).
    ids_BxL: int [B, L], batch split over `batch_axes`.
    scatter_length: Megatron sequence parallelism: return the sum reduce-scattered on length over
      `axis` (P(batch, axis, None)) instead of all-reduced (P(batch, None, None)).

  Communication: one all-reduce (or reduce-scatter) of [B/b, L, D] over `axis`.
  Returns: [B, L, D] in the table's dtype.
  """
  batch = tuple(batch_axes) or None

  def local(table, ids):
    v_local = table.shape[0]
    rel = ids - _slice_start(axis, v_local)
    mine = (rel >= 0) & (rel < v_local)
    x = jnp.take(table, jnp.where(mine, rel, 0), axis=0)
    x = jnp.where(mine[..., None], x, jnp.zeros((), x.dtype))
    if scatter_length:
      return jax.lax.psum_scatter(x, axis, scatter_dimension=1, tiled=True)
    return jax.lax.psum(x, axis)

  out_spec = P(batch, axis, None) if scatter_length else P(batch, None, None)
  return jax.shard_map(local, mesh=mesh, in_specs=(P(axis, None), P(batch, None)), out_specs=out_spec,
                       check_vma=True)(table_VxD, ids_BxL)


def vocab_parallel_cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array, *, mesh: Mesh,
                                 axis: str = "tensor", batch_axes: Sequence[str] = ()) -> jax.Array:
  """Per-token cross-entropy -log softmax(logits)[target] with logits split on vocab over `axis`.

  Args:
    logits_BxLxV: [B, L, V] sharded P(batch, None, axis); any float dtype (math in float32).
    targets_BxL: int [B, L], ids in [0, V).

  Communication: three all-reduces of [B/b, L] over `axis` (max, sum of exponentials, target logit).
  Returns: float32 [B, L], sharded P(batch, None).
  """
  batch = tuple(batch_axes) or None

  def local(logits, targets):
    logits = logits.astype(jnp.float32)
    v_local = logits.shape[-1]
    # The max only keeps exp() in range; it carries no gradient.
    m = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=-1)), axis)
    sum_exp = jax.lax.psum(jnp.sum(jnp.exp(logits - m[..., None]), axis=-1), axis)
    rel = targets - _slice_start(axis, v_local)
    # Out-of-slice targets match no index here, so they pick 0.
    target_logit = jax.lax.psum(_pick(logits, rel), axis)
    return jnp.log(sum_exp) + m - target_logit

  return jax.shard_map(local, mesh=mesh, in_specs=(P(batch, None, axis), P(batch, None)),
                       out_specs=P(batch, None), check_vma=True)(logits_BxLxV, targets_BxL)


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """Dense reference: float32 per-token cross-entropy, [B, L]."""
  logits = logits_BxLxV.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  return lse - _pick(logits, targets_BxL)
