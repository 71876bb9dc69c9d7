"""NoLoCo (Kolehmainen et al. 2025, "NoLoCo: No-all-reduce Low Communication Training Method for
Large Models"): no collective over all islands. Every H inner steps each island averages with one
peer, chosen afresh each outer step from the shared seed, and takes NoLoCo's modified Nesterov
step, whose extra term pulls its outer parameters towards the pair's mean.

Outer step of island i with peer j (inside a `jax.shard_map` manual over `axis`), in DiLoCo's sign
convention (Delta = outer - local, positive along the gradient):
  d = (Delta_i + Delta_j) / 2,  phi_bar = (phi_i + phi_j) / 2
  u = lr d + gamma (phi_i - phi_bar)          (gamma = lowcomm.noloco_gamma)
  m <- mu m + u;  phi_i <- phi_i - (u + mu m)  (nesterov; phi_i - m otherwise)
and the island restarts from phi_i. Over a pair the pull terms cancel, so the islands' mean
follows DiLoCo's step on the mean pseudo-gradient; a round with lr = 0 keeps the mean unchanged.
Communication: one `ppermute` (collective-permute) over `axis` between the pairs, of Delta and
phi: bytes per replica per outer step = 2 x `outer.padded_bytes(params)`. No all-reduce.
The peer schedule is a function of (lowcomm.seed, outer step): nothing to store to resume it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from parallel.lowcomm import outer


def pairing(seed: int, round_index: int, n: int) -> tuple[tuple[int, int], ...]:
  """The pairs of replicas (n even) of outer step `round_index`, from the shared seed."""
  perm = np.random.default_rng([seed, round_index]).permutation(n)
  return tuple(tuple(sorted((int(perm[2 * i]), int(perm[2 * i + 1])))) for i in range(n // 2))


def peer_exchange(tree: Any, axis: str, pairs: tuple[tuple[int, int], ...]) -> tuple[Any, int]:
  """Each replica's copy of its peer's `tree` (float32), spread over the island; (tree, bytes sent)."""
  perm = [(a, b) for a, b in pairs] + [(b, a) for a, b in pairs]
  got = jax.tree.map(lambda x: outer.from_island_flat(jax.lax.ppermute(outer.island_flat(x), axis, perm),
                                                      jax.ShapeDtypeStruct(x.shape, jnp.float32)), tree)
  return got, outer.padded_bytes(tree)


def noloco_sync(outer_params: Any, local_params: Any, momentum: Any, *, axis: str, pairs, lr: float, mu: float,
                gamma: float, nesterov: bool = True) -> tuple[Any, Any, int]:
  """One NoLoCo outer step with the given pairs. Returns (new outer params, new momentum, bytes)."""
  delta = outer.pseudo_gradient(outer_params, local_params)
  (peer_delta, peer_params), sent = peer_exchange((delta, outer_params), axis, pairs)
  f32 = lambda x: x.astype(jnp.float32)
  u = jax.tree.map(lambda d, pd, p, pp: lr * (d + pd) / 2 + gamma * (f32(p) - (f32(p) + pp) / 2),
                   delta, peer_delta, outer_params, peer_params)
  new_m = jax.tree.map(lambda m, v: mu * m + v, momentum, u)
  step = jax.tree.map(lambda v, m: v + mu * m, u, new_m) if nesterov else new_m
  new_p = jax.tree.map(lambda p, s: (f32(p) - s).astype(p.dtype), outer_params, step)
  return new_p, new_m, sent


class NoLoCo:
  """Outer state (per replica, each its own): `params` (outer parameters) and `momentum`."""

  def __init__(self, cfg, n_replicas: int):
    self.cfg, self.n = cfg, n_replicas

  def init(self, params: Any) -> dict:
    return {"params": params, "momentum": outer.zeros_like_f32(params)}

  def events(self, step: int) -> tuple:
    h = self.cfg.inner_steps
    if (step + 1) % h:
      return ()
    return ("sync", pairing(self.cfg.seed, (step + 1) // h - 1, self.n))

  def before(self, events, params, state, *, axis):
    return params, state, 0

  def after(self, events, params, state, *, axis):
    if not events:
      return params, state, 0
    c = self.cfg
    new, momentum, sent = noloco_sync(state["params"], params, state["momentum"], axis=axis, pairs=events[1],
                                      lr=c.outer_lr, mu=c.outer_momentum, gamma=c.noloco_gamma,
                                      nesterov=c.outer_nesterov)
    return new, {"params": new, "momentum": momentum}, sent
