"""Mesh sizes: fill the one -1 axis, check the product, reject axes whose ops are not built yet."""

from __future__ import annotations

import math

from configs.base import Config, MeshConfig
from configs.errors import ConfigError
from configs.validate.require import require

_NOT_YET: tuple[str, ...] = ()  # axes whose parallel ops are not built yet


def resolve_mesh_sizes(mesh: MeshConfig, n_devices: int) -> dict[str, int]:
  """Fills the one `-1` axis so that the product of all axes equals `n_devices`."""
  sizes = mesh.sizes()
  for axis, size in sizes.items():
    require(size > 0 or size == -1, f"mesh.{axis}={size}: axis sizes must be positive, or -1 to fill")
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ConfigError(f"mesh: only one axis may be -1, got {', '.join('mesh.' + a for a in fill)}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if n_devices % known:
      raise ConfigError(f"mesh: the fixed axes multiply to {known}, which does not divide the "
                        f"{n_devices} devices, so mesh.{fill[0]}=-1 cannot fill them")
    sizes[fill[0]] = n_devices // known
  elif known != n_devices:
    shown = " x ".join(f"{a}={s}" for a, s in sizes.items() if s != 1) or "all 1"
    raise ConfigError(f"mesh: product of axis sizes ({shown}) is {known}, but there are {n_devices} devices")
  return sizes


def check(config: Config, sizes: dict[str, int]) -> None:
  del config
  for axis in _NOT_YET:
    require(sizes[axis] == 1, f"mesh.{axis}={sizes[axis]}: {axis} parallelism is not available yet; use size 1")
