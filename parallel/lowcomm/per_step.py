"""The per-step rules over `replica` (1-bit Adam, EControl) in the low-communication runner.

They replace the optimizer, not the outer loop: `as_optax` turns a rule into the island's optax
transformation, whose `update` runs inside the runner's inner step, itself inside the
`jax.shard_map` manual over `axis`, where the rule does its own compressed exchange of the island's
(not replica-averaged) gradients. `PerStep` is the runner's algorithm object (`dispatch.py`):
no outer state and no outer work, only the static byte account of each step (full-precision
warm-up, then compressed), which is how the runner logs `bytes_sent`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from parallel.lowcomm import outer
from parallel.lowcomm.econtrol import EControl
from parallel.lowcomm.onebit_adam import OneBitAdam, island_allreduce_bytes

F32 = jnp.float32


class PerStepState(NamedTuple):
  count: jax.Array  # int32 [], updates done
  rule: Any  # the rule's state (params-shaped trees)


def as_optax(rule: Any, schedule: Callable[[jax.Array], jax.Array], *, axis: str) -> optax.GradientTransformation:
  """`rule` (init(params) / update(grads, state, params, *, axis, step, lr)) as an optax
  transformation with the learning rate schedule(count); call its update inside a shard_map
  manual over `axis`. The updates are new params - params."""
  def init(params):
    return PerStepState(jnp.zeros((), jnp.int32), rule.init(params))

  def update(grads, state, params=None):
    new_params, rule_state, _ = rule.update(grads, state.rule, params, axis=axis, step=state.count,
                                            lr=schedule(state.count))
    updates = jax.tree.map(lambda n, p: (n.astype(F32) - p.astype(F32)).astype(p.dtype), new_params, params)
    return updates, PerStepState(state.count + 1, rule_state)

  return optax.GradientTransformation(init, update)


class PerStep:
  """The runner's view of a per-step rule: events(step) is ("warm",) before freeze_step and
  ("compressed",) after; `after` only reports the bytes the optimizer's exchange sent."""

  def __init__(self, name: str, cfg: Any, n_replicas: int):
    self.name, self.cfg, self.replicas = name, cfg, n_replicas

  def init(self, params: Any) -> dict:
    return {}

  def events(self, step: int) -> tuple[str, ...]:
    return ("warm",) if step < self.cfg.freeze_step else ("compressed",)

  def before(self, events, params, state, *, axis):
    return params, state, 0

  def sent_bytes(self, events: tuple[str, ...], params: Any) -> int:
    """Bytes one replica sends in a step of `events` (inside the runner's shard_map: the island's size is known)."""
    island = outer.island_size()
    if events == ("warm",):
      return outer.padded_bytes(params)
    if self.name == "onebit_adam":
      return sum(island_allreduce_bytes(p.size, self.replicas, island) for p in jax.tree.leaves(params))
    return EControl(eta=self.cfg.econtrol_eta, fraction=self.cfg.topk_fraction).sent_bytes(
        params, compressed=True, island=island)

  def after(self, events, params, state, *, axis):
    return params, state, self.sent_bytes(events, params)


def make_rule(name: str, optimizer_cfg: Any, lowcomm_cfg: Any, replicas: int, decay_mask: Any) -> Any:
  """The rule object for `sharding.replica=name`."""
  if name == "onebit_adam":
    return OneBitAdam.from_config(optimizer_cfg, lowcomm_cfg, replicas, decay_mask)
  if name == "econtrol":
    return EControl.from_config(optimizer_cfg, lowcomm_cfg, decay_mask)
  raise ValueError(f"{name!r} is not a per-step rule over replica (onebit_adam, econtrol)")


PER_STEP = ("onebit_adam", "econtrol")
