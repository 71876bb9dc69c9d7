"""What the executor needs to know, per tick and stage, beyond the schedule: where each stored
activation and gradient lives, where arrivals go, and which way results are sent.

All of it is static (numpy), computed once from the table. Activation inputs are held from the
tick they arrive (or are computed, on the first part) until the tick that finishes with them (W,
or a combined backward); output gradients from their arrival until the same. Slots are reused as
soon as they free: greedy colouring of intervals on a line, so a stage's slot count is exactly
its peak number of held inputs.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from parallel.pipeline.schedule import BW, B, F, IDLE, W, Schedule

UP, DOWN, LOCAL, NONE = 1, -1, 0, 2  # send to stage s+1, to s-1, to myself (a V's turn), nowhere


@dataclasses.dataclass(frozen=True)
class Buffers:
  """int arrays [ticks, stages] (slot -1: nothing; the executor writes those to a spare slot)."""

  first: np.ndarray  # the action's part is the model's first
  last: np.ndarray  # ... its last
  x_slot: np.ndarray  # the action's input activation
  g_slot: np.ndarray  # the action's output gradient (backward and W of every part but the last)
  arrive_x_up: np.ndarray  # at the tick's start: store the activation sent up by stage s-1 here
  arrive_x_down: np.ndarray  # ... sent down by stage s+1
  arrive_g_up: np.ndarray  # gradients likewise
  arrive_g_down: np.ndarray
  send_x: np.ndarray  # where a forward's output goes: UP, DOWN, LOCAL or NONE
  send_g: np.ndarray  # where a backward's input gradient goes
  local_slot: np.ndarray  # LOCAL sends: the slot (x for forwards, g for backwards) it lands in
  x_slots: int
  g_slots: int
  held: np.ndarray  # [ticks, stages]: activation inputs held during each tick
  # Vocabulary parallelism over stages (all stages join the embedding and the head): per tick,
  # the same in every column, the microbatch whose first-part forward, last-part forward and
  # first-part backward runs this tick (-1: none); and where the head's gradient lands.
  embed_mb: np.ndarray
  head_mb: np.ndarray
  embed_grad_mb: np.ndarray
  head_slot: np.ndarray


def plan_buffers(s: Schedule, vocab_parallel: bool = False) -> Buffers:
  """With `vocab_parallel` the last part's forward runs the part (the head runs beside it, on
  all stages) and its backward reads the head's gradient from a slot, as every other part does."""
  p, t_max, last_part = s.stages, s.ticks, s.n_parts - 1
  back = B if s.split_backward else BW
  when, where = {}, {}
  for t in range(t_max):
    for st in range(p):
      k = int(s.kind[t, st])
      if k != IDLE:
        key = (k, int(s.microbatch[t, st]), s.part(st, int(s.chunk[t, st])))
        when[key], where[key] = t, st
  done = W if s.split_backward else BW
  # Activation input of (mb, part): from its arrival (the producer's tick + 1, or the same tick
  # for a hand-over on one stage, or its own forward on part 0) to the tick of `done`.
  x_live, g_live = {}, {}
  for (k, mb, part), t in when.items():
    st = where[(k, mb, part)]
    if k == F:
      if part == 0:
        start = t
      else:
        prev = (F, mb, part - 1)
        start = when[prev] + (0 if where[prev] == st else 1)
      x_live[(mb, part)] = (st, start, when[(done, mb, part)])
    if k == back and part < last_part:
      nxt = (back, mb, part + 1)
      start = when[nxt] + (0 if where[nxt] == st else 1)
      g_live[(mb, part)] = (st, start, when[(done, mb, part)])
    if k == F and part == last_part and vocab_parallel:  # the head's gradient, from this tick
      g_live[(mb, part)] = (st, t, when[(done, mb, part)])
  x_slot_of, x_slots = _colour(x_live, p)
  g_slot_of, g_slots = _colour(g_live, p)

  shape = (t_max, p)
  arr = {name: np.full(shape, -1, int) for name in ("x_slot", "g_slot", "arrive_x_up", "arrive_x_down", "arrive_g_up",
                                                    "arrive_g_down", "local_slot", "embed_mb", "head_mb",
                                                    "embed_grad_mb", "head_slot")}
  first, last = np.zeros(shape, int), np.zeros(shape, int)
  send_x, send_g = np.full(shape, NONE, int), np.full(shape, NONE, int)
  held = np.zeros(shape, int)
  for (mb, part), (st, a, b) in x_live.items():
    held[a:b + 1, st] += 1
  for (k, mb, part), t in when.items():
    st = where[(k, mb, part)]
    first[t, st], last[t, st] = part == 0, part == last_part
    arr["x_slot"][t, st] = x_slot_of[(mb, part)]
    if k in (B, BW, W) and (mb, part) in g_slot_of:
      arr["g_slot"][t, st] = g_slot_of[(mb, part)]
    if vocab_parallel and k == F and part == 0:
      arr["embed_mb"][t, :] = mb
    if vocab_parallel and k == F and part == last_part:
      arr["head_mb"][t, :] = mb
      arr["head_slot"][t, st] = g_slot_of[(mb, part)]
    if vocab_parallel and k in (B, BW) and part == 0:
      arr["embed_grad_mb"][t, :] = mb
    if k == F and part < last_part:
      dst = where[(F, mb, part + 1)]
      send_x[t, st] = _direction(st, dst, p, UP if s.chunk_direction(int(s.chunk[t, st])) > 0 else DOWN)
      if dst == st:
        arr["local_slot"][t, st] = x_slot_of[(mb, part + 1)]
      else:
        name = "arrive_x_up" if send_x[t, st] == UP else "arrive_x_down"
        arr[name][t + 1, dst] = x_slot_of[(mb, part + 1)]
    if k in (B, BW) and part > 0:
      dst = where[(F, mb, part - 1)]
      send_g[t, st] = _direction(st, dst, p, DOWN if s.chunk_direction(int(s.chunk[t, st])) > 0 else UP)
      if dst == st:
        arr["local_slot"][t, st] = g_slot_of[(mb, part - 1)]
      else:
        name = "arrive_g_up" if send_g[t, st] == UP else "arrive_g_down"
        arr[name][t + 1, dst] = g_slot_of[(mb, part - 1)]
  return Buffers(first=first, last=last, send_x=send_x, send_g=send_g, x_slots=x_slots, g_slots=g_slots,
                 held=held, **arr)


def _direction(src: int, dst: int, p: int, prefer: int) -> int:
  """UP or DOWN to a neighbour (`prefer` when, with two stages, both are the same one), LOCAL."""
  if src == dst:
    return LOCAL
  ups, downs = dst == (src + 1) % p, dst == (src - 1) % p
  if ups and downs:
    return prefer
  if ups:
    return UP
  if downs:
    return DOWN
  raise ValueError(f"stage {src} sends to stage {dst}: only neighbours are connected")


def _colour(live: dict, stages: int) -> tuple[dict, int]:
  """Slots for intervals [start, end] per stage, reusing a slot from the tick after it frees."""
  slot_of, most = {}, 0
  for st in range(stages):
    free_at: list[int] = []  # per slot: the first tick it is free again
    for key, (s, a, b) in sorted(live.items(), key=lambda kv: (kv[1][1], kv[1][2])):
      if s != st:
        continue
      slot = next((i for i, f in enumerate(free_at) if f <= a), None)
      if slot is None:
        slot = len(free_at)
        free_at.append(0)
      free_at[slot] = b + 1
      slot_of[key] = slot
    most = max(most, len(free_at))
  return slot_of, max(most, 1)
