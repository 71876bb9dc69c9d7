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


class DiLoCo(outer.PeriodicSync):
  """The runner's view (training/lowcomm.py): outer state `params` (the outer parameters) and
  `momentum`, per replica and identical on all; the sync after every inner_steps-th inner step."""

  buffer = "momentum"

  def sync(self, outer_params, local_params, momentum, *, axis):
    c = self.cfg
    return diloco_sync(outer_params, local_params, momentum, axis=axis, lr=c.outer_lr, mu=c.outer_momentum,
                       nesterov=c.outer_nesterov)
