"""Vocabulary parallelism over pipeline stages (Yeung et al. 2024, "Balancing Pipeline Parallelism
with Vocabulary Parallelism").

Without it the first stage also runs the embedding and the last stage the output layer and its
loss, which for a large vocabulary is several layers' worth of work and memory on one stage. Here
both are split on the vocabulary over all stages, each stage holding V/p rows of the embedding and
V/p columns of the output layer, and every stage does its share when the pipeline needs it:

  embedding   each stage looks up the ids in its slice (zeros elsewhere); one sum over stages
              gives the activation to the stage that runs the first part.
  output      the last part's output is summed (broadcast) to every stage; each computes its
              slice of the logits, and three all-reduces of [rows, length] statistics (max, sum of
              exponentials, target logit) give the loss. The gradient is written out, not taken by
              autodiff through the collectives: d logits = (softmax - one-hot) x mask per slice,
              pulled back through the slice's own projection, and the input's gradient summed
              over stages to the stage that runs the last part's backward.

These functions run inside the executor's `shard_map`, manual over `axis`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from parallel.vocab.dense import pick_target

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class VocabSplit:
  """What the executor needs to split the embedding and the output layer over stages.

  size: the vocabulary size V (divisible by the stage count).
  first_dims, last_dims: pytrees like the first and last parameters: each leaf's vocabulary
    dimension, or None for a leaf every stage holds whole (the final norm's scale).
  ids, targets, mask: the microbatch keys of the input ids, target ids and loss mask.
  """

  size: int
  first_dims: Any
  last_dims: Any
  ids: str = "inputs"
  targets: str = "targets"
  mask: str = "loss_mask"


def _slice(ids: jax.Array, local: int, axis: str) -> tuple[jax.Array, jax.Array]:
  """Ids relative to this stage's slice (0 where outside it) and whether each is inside."""
  rel = ids - jax.lax.axis_index(axis) * local
  mine = (rel >= 0) & (rel < local)
  return jnp.where(mine, rel, 0), mine


def partial_embedding(first_fn: Callable, split: VocabSplit, axis: str, stages: int) -> Callable:
  """(first_params slice, mb) -> this stage's share of the embedding: rows of its slice, zeros
  elsewhere. `first_fn` must act token by token (a lookup, a cast, a scale)."""
  local = split.size // stages

  def share(first_params, mb):
    rel, mine = _slice(mb[split.ids], local, axis)
    x = first_fn(first_params, {**mb, split.ids: rel})
    return jnp.where(mine[..., None], x, jnp.zeros((), x.dtype))

  return share


def head_loss_and_grads(logits_fn: Callable, split: VocabSplit, axis: str, last_params: Any, h: jax.Array,
                        mb: dict) -> tuple[jax.Array, jax.Array, Any, jax.Array]:
  """Loss sum and count of one microbatch (the same on every stage), this stage's parameter
  gradients and the gradient of `h`, summed over stages. `logits_fn(last_params slice, h, mb)`
  gives this stage's [rows, length, V/p] logits."""
  z, pullback = jax.vjp(lambda lp, x: logits_fn(lp, x, mb), last_params, h)
  z32 = z.astype(F32)
  rel, mine = _slice(mb[split.targets], z.shape[-1], axis)
  m = jax.lax.pmax(jnp.max(z32, axis=-1), axis)  # keeps exp() in range
  lse = jnp.log(jax.lax.psum(jnp.sum(jnp.exp(z32 - m[..., None]), axis=-1), axis)) + m
  target = jax.lax.psum(jnp.where(mine, pick_target(z32, rel), 0.0), axis)
  mask = mb[split.mask].astype(F32)
  onehot = (jnp.arange(z.shape[-1]) == rel[..., None]) & mine[..., None]
  dz = (jnp.exp(z32 - lse[..., None]) - onehot) * mask[..., None]
  d_last, d_h = pullback(dz.astype(z.dtype))
  d_last = jax.tree.map(lambda g: g.astype(F32), d_last)
  return jnp.sum((lse - target) * mask), jnp.sum(mask), d_last, jax.lax.psum(d_h.astype(F32), axis)
