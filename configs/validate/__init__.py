"""Every rule a configuration must obey, checked once per start, before anything is built or compiled.

One file per family: `mesh`, `model`, `sharding` (tensor, ZeRO, the plan's strategies),
`context` (the attention method over `seq`), `experts` (expert dispatch and folding), `pipeline`
(the schedule over `stage`), `data`, `optimizer`, `loop` (train and checkpoint sections),
`lowcomm` (the algorithm over `replica`) and `distill` (a teacher's soft targets). Each failure
raises `ConfigError` naming the field(s), the value(s) and the rule that was broken."""

from __future__ import annotations

from configs.base import Config
from configs.validate import (context, data, distill, experts, loop, lowcomm, mesh, model, optimizer, pipeline,
                              sharding)
from configs.validate.mesh import resolve_mesh_sizes


def validate(config: Config, n_devices: int, backend: str | None = None) -> dict[str, int]:
  """Checks every section; returns the resolved mesh sizes (no -1 left).

  `backend` is the JAX platform the run will use ("cpu", "gpu", "tpu"); None asks JAX.
  """
  if backend is None:
    import jax  # deferred: configs stay importable (and cheap) without starting a backend
    backend = jax.default_backend()
  sizes = resolve_mesh_sizes(config.mesh, n_devices)
  mesh.check(config, sizes)
  model.check(config.model, backend)
  sharding.check(config, sizes)
  context.check(config, sizes)
  experts.check(config, sizes, backend)
  pipeline.check(config, sizes)
  data.check(config, sizes)
  optimizer.check(config.optimizer)
  loop.check(config)
  lowcomm.check(config, sizes)
  distill.check(config, sizes)
  return sizes


__all__ = ["resolve_mesh_sizes", "validate"]
