"""ZeRO stages 1/2/3 (Rajbhandari et al. 2020) as rule tables over the `fsdp` axis.

Stage 1 shards the optimizer state, stage 2 also the gradients, stage 3 also the parameters
(FSDP), all on the `embed` dimension. Combined with `data` (replicated) this is hierarchical
sharding: shard inside an island of `fsdp` devices, replicate across islands (ZeRO++ hpZ).
"""

from __future__ import annotations

from parallel.rules import Rules


def zero_tables(weights: Rules, stage: int) -> tuple[Rules, Rules, Rules]:
  """(params, grads, opt_state) tables for a ZeRO stage, on top of the weights' own table."""
  if stage not in (0, 1, 2, 3):
    raise ValueError(f"zero_stage={stage}: choose 0, 1, 2 or 3")
  sharded = {**weights, "embed": "fsdp"}
  pick = lambda first_stage: sharded if stage >= first_stage else dict(weights)
  return pick(3), pick(2), pick(1)
