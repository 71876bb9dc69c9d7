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
from parallel.lowcomm.co2 import CO2
from parallel.lowcomm.diloco import DiLoCo
from parallel.lowcomm.noloco import NoLoCo
from parallel.lowcomm.sparseloco import SparseLoCo
from parallel.lowcomm.streaming_diloco import StreamingDiLoCo

ALGORITHMS = {
    "diloco": lambda cfg, n_layers, n_replicas: DiLoCo(cfg),
    "streaming_diloco": lambda cfg, n_layers, n_replicas: StreamingDiLoCo(cfg, n_layers),
    "noloco": lambda cfg, n_layers, n_replicas: NoLoCo(cfg, n_replicas),
    "co2": lambda cfg, n_layers, n_replicas: CO2(cfg),
    "sparseloco": lambda cfg, n_layers, n_replicas: SparseLoCo(cfg),
}


def algorithm(name: str, cfg: LowCommConfig, n_layers: int, n_replicas: int):
  """The algorithm object for `sharding.replica=name` (not "sync")."""
  if name not in ALGORITHMS:
    raise ValueError(f"replica algorithm {name!r} has no outer runner; runners exist for {sorted(ALGORITHMS)}")
  return ALGORITHMS[name](cfg, n_layers, n_replicas)
