"""The training loop's counters and checkpointing."""

from __future__ import annotations

from configs.base import Config
from configs.validate.require import require


def check(config: Config) -> None:
  t, c = config.train, config.checkpoint
  for name in ("steps", "log_every", "eval_every", "eval_batches"):
    require(getattr(t, name) > 0, f"train.{name}={getattr(t, name)}: must be positive")
  require(c.every > 0, f"checkpoint.every={c.every}: must be positive")
  require(c.keep > 0, f"checkpoint.keep={c.keep}: must be positive")
  require(not (c.init_params_from and c.init_from_hf),
          f"checkpoint.init_params_from={c.init_params_from!r} and checkpoint.init_from_hf={c.init_from_hf!r}: "
          "give one starting point, not both")
