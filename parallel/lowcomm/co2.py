"""CO2 (Sun et al. 2024, "CO2: Efficient Distributed Training with Full Communication-Computation
Overlap"): DiLoCo whose outer all-reduce runs one outer step late, overlapping the next inner
phase, with a staleness penalty and clipping of the outer momentum.

At the boundary before inner step kH (k >= 1), inside a `jax.shard_map` manual over `axis`:
  Delta_k(i) = start_i - local_i               this round's progress of island i (negated)
  issue mean_i Delta_k(i)  (float32 psum)      lands at the next boundary; the inner step that
                                               follows runs in the same program and does not wait
  m <- clip(mu m + P, c);  phi <- phi - lr (P + mu m)   with P the mean that landed now (round
                                               k - 1's; zero at k = 1), c = lowcomm.momentum_clip
                                               on m's global norm (0: none), Nesterov's form
  local_i <- phi - (1 - lambda) Delta_k(i);  start_i <- local_i
lambda = lowcomm.staleness_penalty in [0, 1]: 1 drops the island's own unsynchronised round
(it re-enters through the late average: a one-step-delayed DiLoCo), 0 keeps all of it.
Bytes per replica per outer step: `outer.padded_bytes(params)` (one float32 psum).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from parallel.lowcomm import outer


def clip_by_norm(tree: Any, max_norm: float) -> Any:
  """`tree` scaled down to global norm `max_norm` if it is longer (max_norm = 0: unchanged)."""
  if max_norm <= 0:
    return tree
  norm = optax.tree.norm(tree)
  scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
  return jax.tree.map(lambda x: x * scale, tree)


def co2_boundary(state: dict, local_params: Any, *, axis: str, lr: float, mu: float, clip: float, penalty: float,
                 nesterov: bool = True) -> tuple[Any, dict, int]:
  """One CO2 boundary. state: {"params", "momentum", "start", "pending"}. Returns (new local
  params, new state, bytes sent)."""
  delta = outer.pseudo_gradient(state["start"], local_params)
  pending, sent = outer.replica_mean(delta, axis)
  landed = state["pending"]
  momentum = clip_by_norm(jax.tree.map(lambda m, p: mu * m + p, state["momentum"], landed), clip)
  step = jax.tree.map(lambda p, m: p + mu * m, landed, momentum) if nesterov else momentum
  phi = jax.tree.map(lambda p, s: (p.astype(jnp.float32) - lr * s).astype(p.dtype), state["params"], step)
  local = jax.tree.map(lambda p, d, l: (p.astype(jnp.float32) - (1 - penalty) * d).astype(l.dtype), phi, delta,
                       local_params)
  return local, {"params": phi, "momentum": momentum, "start": local, "pending": pending}, sent


class CO2:
  """Outer state (per replica): `params` (phi, identical on all), `momentum`, `start` (the island's
  parameters at the start of its round) and `pending` (the mean that lands at the next boundary)."""

  def __init__(self, cfg):
    self.cfg = cfg

  def init(self, params: Any) -> dict:
    zeros = outer.zeros_like_f32(params)
    return {"params": params, "momentum": zeros, "start": params, "pending": zeros}

  def events(self, step: int) -> tuple[str, ...]:
    return ("boundary",) if step > 0 and step % self.cfg.inner_steps == 0 else ()

  def before(self, events, params, state, *, axis):
    if not events:
      return params, state, 0
    c = self.cfg
    return co2_boundary(state, params, axis=axis, lr=c.outer_lr, mu=c.outer_momentum, clip=c.momentum_clip,
                        penalty=c.staleness_penalty, nesterov=c.outer_nesterov)

  def after(self, events, params, state, *, axis):
    return params, state, 0
