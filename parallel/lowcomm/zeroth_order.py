"""Zeroth-order training over `replica` with shared randomness: only scalars travel.

Zelikman et al. 2023, "Just One Byte (per gradient): A Note on Low-Bandwidth Decentralized
Language Model Finetuning Using Shared Randomness" (the distributed extension of MeZO's SPSA), with
DistZO2's perturbation parallelism (Wang et al. 2025): every replica evaluates its own
perturbation directions, so the n x D directions of a step are spread over the devices.

Called INSIDE a `jax.shard_map` manual over `axis`; params are identical on every replica (and
stay so), the batch is the replica's own. At step s, replica r and direction j use the Gaussian
direction z(r, j) regenerated from the key fold_in(fold_in(fold_in(key(seed), s), r), j):

  g(r, j) = (loss(params + eps z, batch_r) - loss(params - eps z, batch_r)) / (2 eps)   (SPSA)
  all_gather over `axis` of the D scalars g(r, .) and the replica's loss     (4 (D + 1) bytes)
  params <- params - lr / (n D) sum_{r, j} g(r, j) z(r, j)     (every replica regenerates every z)

The estimate (1 / (n D)) sum g z is unbiased for the gradient of the replicas' mean loss as
eps -> 0 (exactly so for a quadratic loss). No parameter or gradient array is ever communicated:
the all_gather of n (D + 1) float32 scalars is the step's only collective over `axis`. The scalars
and (seed, step) are also a complete record of the update (`apply_projected`), which is how a
replica that joins late can replay the updates it missed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

F32 = jnp.float32


class ZOState(NamedTuple):
  """projected: float32 [replicas, directions], the last step's exchanged projected gradients
  (the same on every replica)."""

  projected: jax.Array


def zo_init(replicas: int, directions: int) -> ZOState:
  return ZOState(jnp.zeros((replicas, directions), F32))


def direction(params: Any, *, seed: Any, step: Any, replica: Any, index: Any) -> Any:
  """z(replica, index) at `step`: standard normal float32 arrays shaped like params."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), replica), index)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, p.shape, F32) for k, p in zip(keys, leaves)])


def _axpy(params: Any, scale: Any, z: Any) -> Any:
  return jax.tree.map(lambda p, d: (p.astype(F32) + scale * d).astype(p.dtype), params, z)


def apply_projected(params: Any, projected: jax.Array, *, seed: Any, step: Any, lr: Any) -> Any:
  """params - lr / (n D) sum_{r, j} projected[r, j] z(r, j): the update from the scalars alone.
  projected: float32 [n, D]. Regenerates one direction at a time (memory: one extra params copy)."""
  n, d = projected.shape

  def add(i, acc):
    r, j = i // d, i % d
    z = direction(params, seed=seed, step=step, replica=r, index=j)
    return jax.tree.map(lambda a, zz: a + projected[r, j] * zz, acc, z)

  total = jax.lax.fori_loop(0, n * d, add, jax.tree.map(lambda p: jnp.zeros(p.shape, F32), params))
  return _axpy(params, -lr / (n * d), total)


def zo_step(loss_fn: Callable[[Any, Any], jax.Array], params: Any, batch: Any, state: ZOState, *,
            axis: str, seed: Any, step: Any, eps: float, lr: Any,
            directions: int) -> tuple[Any, ZOState, dict[str, jax.Array], int]:
  """One shared-randomness zeroth-order step (inside a shard_map manual over `axis`).

  loss_fn(params, batch) -> scalar: the replica's mean loss on its batch (anything inside the
  island is the caller's). Returns (new params, identical on every replica; new state; metrics
  {"loss": mean over replicas and directions of (loss+ + loss-) / 2}; bytes this replica sent).
  """
  if directions < 1:
    raise ValueError(f"zo_step: directions={directions} must be >= 1")
  if eps <= 0:
    raise ValueError(f"zo_step: eps={eps} must be > 0")
  replica = jax.lax.axis_index(axis)

  def one(j):
    z = direction(params, seed=seed, step=step, replica=replica, index=j)
    plus, minus = loss_fn(_axpy(params, eps, z), batch), loss_fn(_axpy(params, -eps, z), batch)
    return (plus - minus).astype(F32) / (2 * eps), (plus + minus).astype(F32) / 2

  projected, losses = jax.lax.map(one, jnp.arange(directions))
  local = jnp.concatenate([projected, jnp.mean(losses)[None]])  # [D + 1]
  gathered = jax.lax.all_gather(local, axis, to="invarying")  # [n, D + 1], the same everywhere
  new_params = apply_projected(params, gathered[:, :directions], seed=seed, step=step, lr=lr)
  metrics = {"loss": jnp.mean(gathered[:, directions])}
  return new_params, ZOState(gathered[:, :directions]), metrics, 4 * (directions + 1)
