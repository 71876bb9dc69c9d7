"""The collectives of a compiled program, read from its HLO text: kind, groups of device positions
and the bytes of each device's operand. Shared by the low-communication tests, which check their
byte accounts against what the program really sends over `replica`."""

from __future__ import annotations

import re

import numpy as np

_OP = re.compile(r"^\s*%?[\w.\-]+ = (\(.*?\)|\S+) (all-reduce|all-gather|collective-permute|all-to-all|reduce-scatter)"
                 r"(?:-start)?\(")
_SHAPE = re.compile(r"(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}


def _shape_bytes(text: str) -> int:
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    total += _BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
  return total


def _groups(line: str) -> list[list[int]]:
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
  if iota:
    g, s = int(iota.group(1)), int(iota.group(2))
    dims = [int(d) for d in iota.group(3).split(",")]
    ids = np.arange(int(np.prod(dims))).reshape(dims)
    if iota.group(4):
      ids = ids.transpose([int(p) for p in iota.group(4).split(",")])
    return ids.reshape(g, s).tolist()
  # JAX 0.12 prints groups by mesh axes: replica_groups=mesh['replica'=4,'data'=2] {'replica'}
  # (devices numbered in mesh order; a group spans the listed axes).
  named = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line)
  if named:
    axes = re.findall(r"'(\w+)'=(\d+)", named.group(1))
    names, dims = [a for a, _ in axes], [int(n) for _, n in axes]
    along = [names.index(a) for a in re.findall(r"'(\w+)'", named.group(2))]
    rest = [i for i in range(len(dims)) if i not in along]
    ids = np.arange(int(np.prod(dims))).reshape(dims).transpose(rest + along)
    return ids.reshape(-1, int(np.prod([dims[i] for i in along]))).tolist()
  listed = re.search(r"(replica_groups|source_target_pairs)=\{(\{[\d,{} ]*\})\}", line)
  if listed:
    return [[int(i) for i in grp.split(",") if i] for grp in re.findall(r"\{([\d,]*)\}", listed.group(2))]
  return []


def collectives(hlo: str) -> list[dict]:
  """[{"kind", "groups" (lists of device positions, or source/target pairs), "operand_bytes" (one
  device's)}] for every collective instruction of the program."""
  out = []
  for line in hlo.splitlines():
    m = _OP.match(line)
    if not m:
      continue
    result, kind = _shape_bytes(m.group(1)), m.group(2)
    groups = _groups(line)
    size = len(groups[0]) if groups and kind != "collective-permute" else 1
    operand = result // size if kind == "all-gather" else result * size if kind == "reduce-scatter" else result
    out.append({"kind": kind, "groups": groups, "operand_bytes": operand})
  return out


def crosses_axis(groups: list[list[int]], mesh_shape: tuple[int, ...], axis: int) -> bool:
  """Whether some group holds two device positions that differ in mesh coordinate `axis`."""
  for grp in groups:
    coords = {np.unravel_index(i, mesh_shape)[axis] for i in grp}
    if len(coords) > 1:
      return True
  return False


def only_along_axis(groups: list[list[int]], mesh_shape: tuple[int, ...], axis: int) -> bool:
  """Whether every group's device positions differ in mesh coordinate `axis` only."""
  for grp in groups:
    coords = [np.unravel_index(i, mesh_shape) for i in grp]
    others = {tuple(c[:axis]) + tuple(c[axis + 1:]) for c in coords}
    if len(others) > 1:
      return False
  return True
