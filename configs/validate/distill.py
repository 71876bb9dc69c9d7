"""Knowledge distillation (the distill section): its knobs, and the layouts a teacher can join."""

from __future__ import annotations

from configs.base import Config
from configs.validate.require import require


def check(config: Config, sizes: dict[str, int]) -> None:
  d = config.distill
  require(0.0 <= d.weight <= 1.0, f"distill.weight={d.weight}: must be in [0, 1] (the KL term's share of the objective)")
  require(d.temperature > 0, f"distill.temperature={d.temperature}: must be positive")
  if not d.teacher:
    return
  require(sizes["stage"] == 1, f"distill.teacher with mesh.stage={sizes['stage']}: a pipeline computes its loss inside "
                               "the schedule, which carries no teacher logits; use mesh.stage=1")
  require(config.sharding.replica == "sync",
          f"distill.teacher with sharding.replica={config.sharding.replica!r}: the replica runner's inner steps take "
          "no teacher logits; use sharding.replica=sync")
