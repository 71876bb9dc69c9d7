"""Device meshes: the one helper that builds every mesh, and multi-host start-up.

Axes run outermost (slowest link) to innermost: replica, stage, data, fsdp, seq, expert, tensor
(`configs.base.MESH_AXES`). Every axis is always present (size 1 costs nothing), so rule tables
can name any of them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from configs.base import CROSS_HOST_AXES, MESH_AXES


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None, *,
              outer_axes_across_hosts: bool = True) -> Mesh:
  """Builds a mesh with all seven named axes and `Auto` axis types.

  Args:
    sizes: axis name -> size, every size resolved (no -1; missing axes are 1); see
      `configs.resolve_mesh_sizes`.
    devices: defaults to all devices of all processes.
    outer_axes_across_hosts: with several processes, lay the slow outer axes (CROSS_HOST_AXES)
      across hosts and keep the fast inner axes (seq, expert, tensor) inside one host.
  """
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"unknown mesh axes {unknown}; the axes are {MESH_AXES}")
  devices = list(jax.devices() if devices is None else devices)
  shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh shape {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                     f"got {len(devices)}")
  n_hosts = len({d.process_index for d in devices})
  if outer_axes_across_hosts and n_hosts > 1:
    grid = _hybrid_grid(shape, devices, n_hosts)
  else:
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@functools.cache
def single_device_mesh() -> Mesh:
  """All axes of size 1 over this process's first device."""
  return make_mesh({}, jax.local_devices()[:1])


def _hybrid_grid(shape: tuple[int, ...], devices: list[jax.Device], n_hosts: int) -> np.ndarray:
  """Splits `n_hosts` over the outer axes (DCN) and the rest inside each host (ICI/NVLink)."""
  dcn = [1] * len(MESH_AXES)
  left = n_hosts
  for axis in CROSS_HOST_AXES:
    i = MESH_AXES.index(axis)
    g = math.gcd(left, shape[i])
    dcn[i], left = g, left // g
  if left != 1:
    raise ValueError(f"cannot spread {n_hosts} hosts over the outer mesh axes of shape "
                     f"{dict(zip(MESH_AXES, shape))}: make {'*'.join(CROSS_HOST_AXES)} a multiple of {n_hosts}")
  ici = [s // d for s, d in zip(shape, dcn)]
  return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=True)


def initialize_distributed(coordinator: str | None, num_processes: int | None,
                           process_id: int | None, local_device_ids: Sequence[int] | None = None) -> None:
  """Starts multi-host JAX when a coordinator is given; a no-op for a single process."""
  if not coordinator:
    return
  if num_processes is None or process_id is None:
    raise ValueError("multi-host: --coordinator needs --num_processes and --process_id")
  # Cross-process collectives of the CPU backend go through gloo; GPUs and TPUs ignore this.
  # (Asking for the backend here would start it before `initialize`, which must come first.)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids)
  if jax.default_backend() == "cpu" and _version(jax.__version__) >= (0, 12):
    # JAX 0.12's CPU processes hang in their first gloo collective when their step programs come
    # from the persistent compilation cache (a second run on a warm cache never finishes its first
    # step; a cold cache is fine). Multi-process CPU runs compile afresh instead.
    jax.config.update("jax_enable_compilation_cache", False)


def _version(text: str) -> tuple[int, ...]:
  return tuple(int(p) for p in text.split(".")[:2])
