"""Vocabulary-parallel embedding lookup and cross-entropy (Megatron-LM, Shoeybi et al. 2019).

The vocabulary is split into contiguous slices over one mesh axis (`tensor`). Each device looks up
or scores only its slice; the results are combined with all-reduces of [batch, length] statistics,
so the full-vocabulary logits are never gathered on one device.

Token ids outside [0, V) would silently pick nothing (a zero embedding, or a loss equal to the
log-sum-exp). Both ops check them: at once when the ids are concrete arrays; inside `jit` (where
a check would cost a device-to-host sync every step) only when
`jax.config.update("jax_enable_checks", True)` is set, as a `checkify` check: run the function
under `jax.experimental.checkify.checkify` and call `err.throw()` on the error it returns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jax.sharding import Mesh, PartitionSpec as P

from parallel.vocab.dense import pick_target


def _slice_start(axis: str, local_size: int) -> jax.Array:
  return jax.lax.axis_index(axis) * local_size


def _raise_if_out_of_range(ids: np.ndarray, size: int, what: str) -> None:
  ids = np.asarray(ids)
  if ids.size and (ids.min() < 0 or ids.max() >= size):
    bad = ids[(ids < 0) | (ids >= size)]
    raise ValueError(f"{what}: {bad.size} id(s) outside [0, {size}), e.g. {int(bad.flat[0])}")


def _check_ids(ids: jax.Array, size: int, what: str) -> None:
  if not isinstance(ids, jax.core.Tracer):
    _raise_if_out_of_range(ids, size, what)
  elif jax.config.jax_enable_checks:
    bad = (ids < 0) | (ids >= size)
    checkify.check(~jnp.any(bad), f"{what}: id(s) outside [0, {size}), e.g. {{first}}",
                   first=jnp.where(jnp.any(bad), ids.ravel()[jnp.argmax(bad.ravel())], 0))


def _check_shapes(mesh: Mesh, axis: str, batch_axes: Sequence[str], length_axes: Sequence[str], vocab: int,
                  shape_BxL: tuple[int, ...], what: str) -> None:
  if axis not in mesh.shape:
    raise ValueError(f"{what}: axis={axis!r} is not a mesh axis (mesh axes: {tuple(mesh.shape)})")
  if vocab % mesh.shape[axis]:
    raise ValueError(f"{what}: vocabulary size {vocab} is not divisible by mesh axis {axis!r} of size "
                     f"{mesh.shape[axis]}")
  rows = math.prod(mesh.shape[a] for a in batch_axes)
  cols = math.prod(mesh.shape[a] for a in length_axes)
  if len(shape_BxL) != 2 or shape_BxL[0] % rows or shape_BxL[1] % cols:
    raise ValueError(f"{what}: ids/targets must be [batch, length] with batch divisible by the batch axes "
                     f"{tuple(batch_axes)} (size {rows}) and length by the length axes {tuple(length_axes)} "
                     f"(size {cols}); got shape {shape_BxL}")


def vocab_parallel_embed(table_VxD: jax.Array, ids_BxL: jax.Array, *, mesh: Mesh, axis: str = "tensor",
                         batch_axes: Sequence[str] = (), length_axes: Sequence[str] = (),
                         scatter_length: bool = False) -> jax.Array:
  """Embedding lookup with the table split on vocab over `axis`.

  Args:
    table_VxD: [V, D], sharded P(axis, None) (other shardings are resharded on entry).
    ids_BxL: int [B, L], ids in [0, V), batch split over `batch_axes`, length over `length_axes`
      (context parallelism).
    scatter_length: Megatron sequence parallelism: return the sum reduce-scattered on length over
      `axis` too (P(batch, (*length, axis), None)) instead of all-reduced (P(batch, length, None)).

  Communication: one all-reduce (or reduce-scatter) of the local [B/b, L/l, D] over `axis`.
  Returns: [B, L, D] in the table's dtype.
  """
  what = "vocab_parallel_embed"
  _check_shapes(mesh, axis, batch_axes, length_axes, table_VxD.shape[0], ids_BxL.shape, what)
  local_length = ids_BxL.shape[1] // math.prod(mesh.shape[a] for a in length_axes)
  if scatter_length and local_length % mesh.shape[axis]:
    raise ValueError(f"{what}: scatter_length needs the local length {local_length} to be divisible by mesh "
                     f"axis {axis!r} of size {mesh.shape[axis]}")
  _check_ids(ids_BxL, table_VxD.shape[0], f"{what} ids")
  batch, length = tuple(batch_axes) or None, tuple(length_axes) or None

  def local(table, ids):
    v_local = table.shape[0]
    rel = ids - _slice_start(axis, v_local)
    mine = (rel >= 0) & (rel < v_local)
    x = jnp.take(table, jnp.where(mine, rel, 0), axis=0)
    x = jnp.where(mine[..., None], x, jnp.zeros((), x.dtype))
    if scatter_length:
      return jax.lax.psum_scatter(x, axis, scatter_dimension=1, tiled=True)
    return jax.lax.psum(x, axis)

  out_spec = P(batch, (*length_axes, axis), None) if scatter_length else P(batch, length, None)
  return jax.shard_map(local, mesh=mesh, in_specs=(P(axis, None), P(batch, length)), out_specs=out_spec,
                       check_vma=True)(table_VxD, ids_BxL)


def vocab_parallel_cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array, *, mesh: Mesh,
                                 axis: str = "tensor", batch_axes: Sequence[str] = (),
                                 length_axes: Sequence[str] = ()) -> jax.Array:
  """Per-token cross-entropy -log softmax(logits)[target] with logits split on vocab over `axis`.

  Args:
    logits_BxLxV: [B, L, V] sharded P(batch, length, axis); any float dtype (math in float32).
    targets_BxL: int [B, L], ids in [0, V).

  Communication: three all-reduces of the local [B/b, L/l] over `axis` (max, sum of exponentials,
  target logit).
  Returns: float32 [B, L], sharded P(batch, length).
  """
  what = "vocab_parallel_cross_entropy"
  if logits_BxLxV.ndim != 3 or logits_BxLxV.shape[:2] != targets_BxL.shape:
    raise ValueError(f"{what}: logits must be [B, L, V] and targets [B, L]; got {logits_BxLxV.shape} and "
                     f"{targets_BxL.shape}")
  _check_shapes(mesh, axis, batch_axes, length_axes, logits_BxLxV.shape[-1], targets_BxL.shape, what)
  _check_ids(targets_BxL, logits_BxLxV.shape[-1], f"{what} targets")
  batch, length = tuple(batch_axes) or None, tuple(length_axes) or None

  def local(logits, targets):
    logits = logits.astype(jnp.float32)
    v_local = logits.shape[-1]
    # The max only keeps exp() in range; it carries no gradient.
    m = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=-1)), axis)
    sum_exp = jax.lax.psum(jnp.sum(jnp.exp(logits - m[..., None]), axis=-1), axis)
    rel = targets - _slice_start(axis, v_local)
    # Out-of-slice targets match no index here, so they pick 0.
    target_logit = jax.lax.psum(pick_target(logits, rel), axis)
    return jnp.log(sum_exp) + m - target_logit

  return jax.shard_map(local, mesh=mesh, in_specs=(P(batch, length, axis), P(batch, length)),
                       out_specs=P(batch, length), check_vma=True)(logits_BxLxV, targets_BxL)
