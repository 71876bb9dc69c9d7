"""The low-communication algorithms over `replica` (sharding.replica) and their knobs (lowcomm)."""

from __future__ import annotations

from configs.base import Config
from configs.validate.require import require

# Algorithms the runner (training/lowcomm.py) runs so far; the others are refused until they land.
BUILT = ("sync", "diloco", "streaming_diloco", "noloco", "co2", "sparseloco", "onebit_adam", "econtrol",
         "zeroth_order")
_OUTER = ("diloco", "streaming_diloco", "noloco", "co2", "sparseloco")  # H inner steps, then an outer step
QUANT_BITS = (0, 2, 4, 8)  # 0: no quantisation (parallel/lowcomm/compress.py has 2, 4 and 8)


def check(config: Config, sizes: dict[str, int]) -> None:
  algo, c = config.sharding.replica, config.lowcomm
  if algo == "sync":
    return
  require(algo in BUILT, f"sharding.replica={algo!r} is not available yet; choose one of {BUILT}")
  require(sizes["replica"] > 1, f"sharding.replica={algo!r} needs islands to average over, but "
                                f"mesh.replica={sizes['replica']}: set mesh.replica to 2 or more")
  require(config.model.n_experts == 0,
          f"sharding.replica={algo!r} with model.n_experts={config.model.n_experts}: experts inside an island are not "
          f"supported by the replica runner yet; use sharding.replica=sync")
  for axis, what in (("stage", "a pipeline"), ("seq", "context parallelism")):
    require(sizes[axis] == 1, f"sharding.replica={algo!r} with mesh.{axis}={sizes[axis]}: {what} inside an island is "
                              f"not supported yet (XLA's SPMD partitioner fails on its shard_map nested in the one "
                              f"over replica); use mesh.{axis}=1")
  if algo in ("onebit_adam", "econtrol"):
    require(c.freeze_step >= 1, f"lowcomm.freeze_step={c.freeze_step}: must be >= 1 (the full-precision warm-up "
                                f"sets the variance that compression freezes)")
  if algo == "econtrol":
    require(c.econtrol_eta > 0, f"lowcomm.econtrol_eta={c.econtrol_eta}: must be positive")
    require(0.0 < c.topk_fraction <= 1.0, f"lowcomm.topk_fraction={c.topk_fraction}: must be in (0, 1]")
  if algo == "zeroth_order":
    require(c.zo_eps > 0, f"lowcomm.zo_eps={c.zo_eps}: must be positive")
    require(c.zo_directions >= 1, f"lowcomm.zo_directions={c.zo_directions}: must be >= 1")
  if algo not in _OUTER:
    return
  require(c.inner_steps >= 1, f"lowcomm.inner_steps={c.inner_steps}: H must be >= 1")
  require(c.outer_lr > 0, f"lowcomm.outer_lr={c.outer_lr}: must be positive")
  require(0.0 <= c.outer_momentum < 1.0, f"lowcomm.outer_momentum={c.outer_momentum}: must be in [0, 1)")
  if algo == "streaming_diloco":
    n = config.model.n_layers
    require(1 <= c.fragments <= n, f"lowcomm.fragments={c.fragments}: must be in 1..model.n_layers={n}")
    require(n % c.fragments == 0, f"lowcomm.fragments={c.fragments} does not divide model.n_layers={n} "
                                  f"(each fragment holds every fragments-th layer)")
    require(c.inner_steps >= c.fragments, f"lowcomm.inner_steps={c.inner_steps} is fewer than lowcomm.fragments="
                                          f"{c.fragments}: each fragment needs its own sync step within H")
    require(0 <= c.delay < c.inner_steps, f"lowcomm.delay={c.delay}: tau must be in 0..lowcomm.inner_steps-1="
                                          f"{c.inner_steps - 1} (an update lands before its fragment syncs again)")
    require(0.0 <= c.mix <= 1.0, f"lowcomm.mix={c.mix}: alpha must be in [0, 1]")
  if algo in ("streaming_diloco", "sparseloco"):
    require(c.quant_bits in QUANT_BITS, f"lowcomm.quant_bits={c.quant_bits}: choose one of {QUANT_BITS} (0: none)")
  if algo == "sparseloco":
    require(0.0 < c.topk_fraction <= 1.0, f"lowcomm.topk_fraction={c.topk_fraction}: must be in (0, 1]")
  if algo == "noloco":
    require(sizes["replica"] % 2 == 0, f"sharding.replica='noloco' pairs islands: mesh.replica={sizes['replica']} "
                                       f"must be even")
    require(0.0 <= c.noloco_gamma <= 1.0, f"lowcomm.noloco_gamma={c.noloco_gamma}: must be in [0, 1]")
  if algo == "co2":
    require(0.0 <= c.staleness_penalty <= 1.0, f"lowcomm.staleness_penalty={c.staleness_penalty}: must be in [0, 1]")
    require(c.momentum_clip >= 0, f"lowcomm.momentum_clip={c.momentum_clip}: must be >= 0 (0 disables)")
