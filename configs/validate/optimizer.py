"""AdamW, its schedule and clipping."""

from __future__ import annotations

from configs.base import OptimizerConfig
from configs.validate.require import require


def check(o: OptimizerConfig) -> None:
  require(o.learning_rate > 0, f"optimizer.learning_rate={o.learning_rate}: must be positive")
  require(0.0 <= o.min_lr_ratio <= 1.0, f"optimizer.min_lr_ratio={o.min_lr_ratio}: must be in [0, 1]")
  require(o.warmup_steps >= 0, f"optimizer.warmup_steps={o.warmup_steps}: must be >= 0")
  for name in ("b1", "b2"):
    value = getattr(o, name)
    require(0.0 <= value < 1.0, f"optimizer.{name}={value}: Adam's decay rates must be in [0, 1)")
  require(o.eps > 0, f"optimizer.eps={o.eps}: must be positive")
  require(o.weight_decay >= 0, f"optimizer.weight_decay={o.weight_decay}: must be >= 0")
  require(o.grad_clip >= 0, f"optimizer.grad_clip={o.grad_clip}: must be >= 0 (0 disables)")
