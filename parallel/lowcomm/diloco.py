"""DiLoCo (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of Language
Models"): each island runs H inner AdamW steps on its own, then all islands average their
pseudo-gradients (outer params - local params) and take one outer Nesterov step from the shared
outer parameters; every island restarts from the result.

Called inside a `jax.shard_map` manual over `axis` (the replica axis): arrays are one island's,
laid out over the island's own axes. Communication: one float32 psum over `axis` of the
pseudo-gradient, spread over the island's devices (`outer.island_flat`); nothing else crosses
`axis`. Bytes per replica per outer step: `outer.padded_bytes(params)` (4 x parameters, padded).
"""

from __future__ import annotations

from typing import Any

from parallel.lowcomm import outer


def diloco_sync(outer_params: Any, local_params: Any, momentum: Any, *, axis: str, lr: float, mu: float,
                nesterov: bool = True) -> tuple[Any, Any, int]:
  """One DiLoCo outer step. Shapes: every tree like the parameters (momentum float32).

  Returns (new outer params = every island's new local params, new momentum, bytes sent)."""
  delta, sent = outer.replica_mean(outer.pseudo_gradient(outer_params, local_params), axis)
  new_params, new_momentum = outer.nesterov_step(outer_params, delta, momentum, lr=lr, mu=mu, nesterov=nesterov)
  return new_params, new_momentum, sent


class DiLoCo:
  """The runner's view (training/lowcomm.py): outer state, the steps that sync, and the sync.

  Outer state (per replica, identical on all): `params` (the outer parameters) and `momentum`.
  The sync runs after inner step t when (t + 1) % inner_steps == 0.
  """

  def __init__(self, cfg):
    self.cfg = cfg

  def init(self, params: Any) -> dict:
    return {"params": params, "momentum": outer.zeros_like_f32(params)}

  def events(self, step: int) -> tuple[str, ...]:
    return ("sync",) if (step + 1) % self.cfg.inner_steps == 0 else ()

  def before(self, events, params, state, *, axis):
    return params, state, 0

  def after(self, events, params, state, *, axis):
    if "sync" not in events:
      return params, state, 0
    c = self.cfg
    new, momentum, sent = diloco_sync(state["params"], params, state["momentum"], axis=axis, lr=c.outer_lr,
                                      mu=c.outer_momentum, nesterov=c.outer_nesterov)
    return new, {"params": new, "momentum": momentum}, sent
