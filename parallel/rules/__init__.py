"""Rule fragments: tables mapping logical dimension names to mesh axes, one file per family.

`megatron` (tensor and sequence parallelism) and `zero` (where parameters, gradients and
optimizer state live) are combined into a `ShardingPlan` by `parallel.plan.make_plan`.
"""

from collections.abc import Mapping

MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes]
