"""Pipeline schedules as data: for each tick and stage, the action, its microbatch and its chunk.

Papers: GPipe (Huang et al. 2019); 1F1B (PipeDream-Flush, Narayanan et al. 2021); interleaved
virtual stages (Narayanan et al., "Efficient Large-Scale Language Model Training on GPU Clusters
Using Megatron-LM", 2021); Zero Bubble, ZB-H1 and ZB-V (Qi et al. 2023), whose backward is split
into B (the gradient of the input, on the critical path) and W (the weights' gradient, which can
wait to fill a bubble).

A model of `n_parts` consecutive parts (slices of the layer stack) runs on `stages` devices; each
stage holds `chunks` parts (virtual stages): `part(stage, chunk)`. Ticks are lockstep: at every
tick each stage performs at most one action, and whatever it produced for another stage arrives
for the next tick. The table therefore is exactly what an SPMD executor runs: one `switch` per
tick per stage, then one `ppermute` of activations forward and one of gradients backward.

Each schedule is built by a greedy tick-by-tick list scheduler with the schedule's own priorities
and memory limit (the number of microbatch-parts whose activations a stage may hold: forward done,
weight gradient not yet), then checked: every F before its B before its W, every dependency on
another stage at least one tick earlier, every action exactly once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

IDLE, F, B, W, BW = 0, 1, 2, 3, 4  # BW: input and weight gradients in one backward (no split)
ACTION_NAMES = {IDLE: ".", F: "F", B: "B", W: "W", BW: "B"}
SCHEDULES = ("gpipe", "circular", "1f1b", "interleaved", "zb-h1", "zb-v")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A lockstep pipeline schedule. `kind`, `microbatch` and `chunk` are int arrays [ticks, stages]."""

  name: str
  stages: int
  microbatches: int
  chunks: int
  kind: np.ndarray
  microbatch: np.ndarray
  chunk: np.ndarray
  placement: str  # "loop" (part = chunk * stages + stage) or "v" (chunk 1 runs the stages backwards)

  @property
  def n_parts(self) -> int:
    return self.stages * self.chunks

  @property
  def ticks(self) -> int:
    return self.kind.shape[0]

  @property
  def split_backward(self) -> bool:
    return bool(np.any(self.kind == W))

  def part(self, stage: int, chunk: int) -> int:
    return part_of(self.placement, self.stages, stage, chunk)

  def chunk_direction(self, chunk: int) -> int:
    """+1 if the forward of `chunk` runs up the stages (to s+1), -1 if down (a V's second arm)."""
    return -1 if self.placement == "v" and chunk == 1 else 1

  def location(self, part: int) -> tuple[int, int]:
    """(stage, chunk) that runs `part`."""
    return location_of(self.placement, self.stages, part)

  def render(self) -> str:
    """One line per stage, one cell per tick: F3 / B3 / W3 (microbatch 3), lowercase for chunk 1+."""
    lines = []
    for s in range(self.stages):
      cells = []
      for t in range(self.ticks):
        k = self.kind[t, s]
        name = ACTION_NAMES[k] if self.chunk[t, s] == 0 else ACTION_NAMES[k].lower()
        cells.append(f"{name}{self.microbatch[t, s]}" if k != IDLE else " .")
      lines.append(f"stage {s}: " + " ".join(f"{c:>3}" for c in cells))
    return "\n".join(lines)


def part_of(placement: str, stages: int, stage: int, chunk: int) -> int:
  if placement == "v":  # stage s holds parts s and 2p-1-s: the V of ZB-V
    return stage if chunk == 0 else 2 * stages - 1 - stage
  return chunk * stages + stage


def location_of(placement: str, stages: int, part: int) -> tuple[int, int]:
  if placement == "v":
    return (part, 0) if part < stages else (2 * stages - 1 - part, 1)
  return part % stages, part // stages


Key = tuple[int, int, int]  # (kind, microbatch, part)


def _greedy(name: str, stages: int, microbatches: int, chunks: int, placement: str, split: bool, limit: Callable,
            priority: Callable, w_cap: Callable | None = None, order: dict | None = None) -> Schedule:
  """Tick by tick, each stage runs its highest-priority ready action. `priority(stage, key)` is a
  sort key (smaller first). F runs only while the stage holds fewer than `limit(stage)` forwards
  whose backward (B) has not run; with a split backward, B runs only while fewer than
  `w_cap(stage)` weight gradients wait. `order`: per stage, a fixed sequence of actions run
  strictly in turn (the stage idles until the next one is ready) instead of by priority."""
  n_parts = stages * chunks
  done: dict[Key, int] = {}  # action -> tick it ran
  todo = {s: [] for s in range(stages)}
  for mb in range(microbatches):
    for part in range(n_parts):
      s, _ = location_of(placement, stages, part)
      todo[s] += [(F, mb, part), (B if split else BW, mb, part)] + ([(W, mb, part)] if split else [])
  if order is not None:
    todo = {s: list(order[s]) for s in range(stages)}
  before_b = np.zeros(stages, int)  # forwards whose B has not run
  waiting_w = np.zeros(stages, int)  # B done, W not yet
  rows = []
  t = 0
  while any(todo.values()):
    if t > 4 * microbatches * n_parts * 3 + 8 * stages:
      raise RuntimeError(f"{name}: the greedy scheduler made no progress (a bug in its priorities)")
    row = []
    ran = []
    for s in range(stages):
      allowed = lambda a: ((a[0] != F or before_b[s] < limit(s))
                           and (a[0] != B or w_cap is None or waiting_w[s] < w_cap(s)))
      candidates = todo[s][:1] if order is not None else todo[s]
      ready = [a for a in candidates if _ready(a, done, t, n_parts, split) and allowed(a)]
      if not ready:
        row.append((IDLE, 0, 0))
        continue
      a = min(ready, key=lambda a: priority(s, a))
      row.append((a[0], a[1], location_of(placement, stages, a[2])[1]))
      ran.append((s, a))
    for s, a in ran:
      todo[s].remove(a)
      done[a] = t
      before_b[s] += int(a[0] == F) - int(a[0] in (B, BW))
      waiting_w[s] += int(a[0] == B) - int(a[0] == W)
    rows.append(row)
    t += 1
  arr = np.asarray(rows, int)  # [ticks, stages, 3]
  schedule = Schedule(name, stages, microbatches, chunks, arr[..., 0], arr[..., 1], arr[..., 2], placement)
  check(schedule)
  return schedule


def _ready(a: Key, done: dict[Key, int], t: int, n_parts: int, split: bool) -> bool:
  kind, mb, part = a
  before = lambda key: key in done and done[key] < t
  if kind == F:
    return part == 0 or before((F, mb, part - 1))
  if kind in (B, BW):
    after_me = (B if split else BW, mb, part + 1)
    return before((F, mb, part)) and (part == n_parts - 1 or before(after_me))
  return before((B, mb, part))  # W


def check(s: Schedule) -> None:
  """Raises ValueError unless every action runs once and after what it needs (a tick earlier)."""
  when: dict[Key, int] = {}
  for t in range(s.ticks):
    for st in range(s.stages):
      k = int(s.kind[t, st])
      if k == IDLE:
        continue
      key = (k, int(s.microbatch[t, st]), s.part(st, int(s.chunk[t, st])))
      if key in when:
        raise ValueError(f"{s.name}: {key} runs twice")
      when[key] = t
  backward = B if s.split_backward else BW
  for mb in range(s.microbatches):
    for part in range(s.n_parts):
      need = [(F, mb, part), (backward, mb, part)] + ([(W, mb, part)] if s.split_backward else [])
      for key in need:
        if key not in when:
          raise ValueError(f"{s.name}: {key} never runs")
      if part and when[(F, mb, part - 1)] >= when[(F, mb, part)]:
        raise ValueError(f"{s.name}: F of microbatch {mb} reaches part {part} before part {part - 1} is done")
      if when[(F, mb, part)] >= when[(backward, mb, part)]:
        raise ValueError(f"{s.name}: microbatch {mb} part {part}: backward before forward")
      if part < s.n_parts - 1 and when[(backward, mb, part + 1)] >= when[(backward, mb, part)]:
        raise ValueError(f"{s.name}: backward of microbatch {mb} at part {part} before part {part + 1}")
      if s.split_backward and when[(B, mb, part)] >= when[(W, mb, part)]:
        raise ValueError(f"{s.name}: W of microbatch {mb} part {part} before its B")


def make_schedule(name: str, stages: int, microbatches: int, chunks: int = 1) -> Schedule:
  """The table of schedule `name` (one of SCHEDULES). `chunks` is for the interleaved and
  circular schedules (virtual stages per device); ZB-V always has 2."""
  if name not in SCHEDULES:
    raise ValueError(f"schedule {name!r}: choose one of {SCHEDULES}")
  if stages < 1 or microbatches < 1 or chunks < 1:
    raise ValueError(f"stages={stages}, microbatches={microbatches}, chunks={chunks}: must be positive")
  p, m = stages, microbatches
  fifo = lambda s, a: (a[1], a[2])  # oldest microbatch first
  if name == "gpipe":  # every forward, then every backward
    return _greedy(name, p, m, 1, "loop", False, lambda s: m, lambda s, a: (a[0] != F, a[1]))
  if name == "circular":  # GPipe over virtual stages: the microbatches loop the ring `chunks` times
    return _greedy(name, p, m, chunks, "loop", False, lambda s: m * chunks,
                   lambda s, a: (a[0] != F, a[2] if a[0] == F else -a[2], a[1]))
  if name == "1f1b":  # warm up with p - s forwards, then one backward for each forward
    return _greedy(name, p, m, 1, "loop", False, lambda s: p - s, lambda s, a: (a[0] == F,) + fifo(s, a))
  if name == "interleaved":
    if m % p:
      raise ValueError(f"interleaved: microbatches={m} must be a multiple of stages={p}")
    order = {s: _megatron_interleaved(s, p, m, chunks) for s in range(p)}
    return _greedy(name, p, m, chunks, "loop", False, lambda s: m * chunks, lambda s, a: 0, order=order)
  zb = lambda s, a: ({B: 0, F: 1, W: 2}[a[0]],) + fifo(s, a)  # B first, W only to fill a gap
  if name == "zb-h1":  # 1F1B's forwards in flight; each stage may let p-s-1 weight gradients wait
    return _greedy(name, p, m, 1, "loop", True, lambda s: p - s, zb, w_cap=lambda s: max(p - s - 1, 1))
  # zb-v: two chunks per stage in a V (stage s: parts s and 2p-1-s); up to 2p chunk forwards in
  # flight (1F1B's p whole-stage ones) and one weight gradient waiting; later parts first.
  return _greedy(name, p, m, 2, "v", True, lambda s: 2 * p, lambda s, a: (zb(s, a)[0], a[1], -a[2]),
                 w_cap=lambda s: 1)


def _megatron_interleaved(s: int, p: int, m: int, v: int) -> list[Key]:
  """Megatron-LM's order for stage s: warm-up forwards, then one forward and one backward in
  turn, then the remaining backwards; virtual microbatch k is chunk (k // p) % v (backwards from
  the last chunk) of microbatch (k // (p v)) * p + k % p.

  The warm-up is (p - s - 1) + (v - 1) p forwards, not Megatron-LM's 2 (p - s - 1) + (v - 1) p
  (forward_backward_pipelining_with_interleaving). Megatron's steady state exchanges a forward's
  output and a backward's gradient with both neighbours in one blocking batched call per
  forward-backward pair, and its warm-up count keeps those paired exchanges matched. Here a tick
  holds one action, every tick ends in the same ppermutes, and a stage whose next action is not
  ready idles that tick, so any deadlock-free order is correct; each stage's first backward (of
  microbatch 0's last chunk) runs at tick v p + p - 1 - s with either count, after microbatch 0
  has gone up all v p parts and its gradient come back down. Over p in {2, 3, 4, 5, 6, 8, 16},
  v in {1, 2, 3, 4} and m in {p, 2p, 3p, 4p} the simulator gives both orders the same ticks and
  step time (F = B, B = 2F,
  F = 2B, B = 3F; with a transfer cost too): Megatron's extra p - s - 1 forwards only run before
  the first backward ticks the stage would otherwise idle later, and hold up to p - s - 1 more
  inputs (stage 0 of p = 8, m = 16, v = 2: 20 rather than 23). With v = 1 this is 1F1B's order.
  The warm-up stays below m v (m >= p), so every stage enters the steady state."""
  total = m * v
  warmup = (p - s - 1) + (v - 1) * p
  mb = lambda k: (k // (p * v)) * p + k % p
  fwd = lambda k: (F, mb(k), ((k // p) % v) * p + s)
  bwd = lambda k: (BW, mb(k), (v - 1 - (k // p) % v) * p + s)
  seq = [fwd(k) for k in range(warmup)]
  for i in range(total - warmup):
    seq += [fwd(warmup + i), bwd(i)]
  return seq + [bwd(k) for k in range(total - warmup, total)]
