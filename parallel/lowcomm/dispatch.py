"""The algorithm over `replica` named by the plan (`plan.strategies.replica`), for the runner.

Each algorithm is an object with
  init(params) -> outer state (a pytree; each replica keeps its own copy),
  events(step) -> a hashable, static description of what happens around inner step `step`
                  (() for a plain inner step); one compiled program per distinct value,
  before(events, params, state, *, axis) -> (params, state, bytes sent)   before the inner step,
  after(events, params, state, *, axis) -> (params, state, bytes sent)    after it,
the last two called inside a `jax.shard_map` manual over `axis` with one island's arrays.
Work issued in `before` and not needed by the inner step (an all-reduce whose result lands later)
overlaps that inner step in the same compiled program.
"""

from __future__ import annotations

from configs.base import LowCommConfig
from parallel.lowcomm.diloco import DiLoCo

ALGORITHMS = {"diloco": DiLoCo}


def algorithm(name: str, cfg: LowCommConfig, n_layers: int):
  """The algorithm object for `sharding.replica=name` (not "sync")."""
  if name not in ALGORITHMS:
    raise ValueError(f"replica algorithm {name!r} has no outer runner; runners exist for {sorted(ALGORITHMS)}")
  cls = ALGORITHMS[name]
  return cls(cfg, n_layers) if getattr(cls, "needs_layers", False) else cls(cfg)
