"""The pipeline simulator: step time, bubble and activation memory of a schedule table, and its
timeline drawn as a PNG.

It reads the same table the executor runs. Ticks are lockstep, as in the executor: a tick lasts as
long as its slowest action, plus one transfer when any stage sends an activation or a gradient to
another stage (`buffers.plan_buffers`: not the last part's forward, whose output stays for its
backward, nor the first part's backward, nor a V's turn on one stage, nor W). Costs are per
microbatch and whole stage (all of its layers); a part of a stage with `chunks` parts costs 1/chunks
of it. A combined backward (no B/W split) costs B + W.

Memory is the executor's: `buffers.plan_buffers` holds each input from its arrival to its last
use. Closed forms this agrees with (checked in the tests), for F = B + W and no transfer cost: GPipe
and 1F1B idle a fraction (p-1)/(m+p-1) of the step; interleaving v chunks per stage divides the
idle time by v, (p-1)/(v*m+p-1); ZB-H1 idles about a third as long as 1F1B when F = B = W.

The output layer and its loss (`head`, forward and backward of one microbatch) run either on the
last part's stage, inside that part's backward, or, with vocabulary parallelism, split over all
stages: a tick in which the last part's forward runs lasts `head / p` longer, on every stage.
"""

from __future__ import annotations

import numpy as np

from parallel.pipeline.buffers import DOWN, UP, plan_buffers
from parallel.pipeline.schedule import ACTION_NAMES, B, BW, F, IDLE, W, Schedule


def action_costs(schedule: Schedule, f: float, b: float, w: float, head: float = 0.0) -> np.ndarray:
  """float [ticks, stages]: each action's cost (0 when idle); `head` is added to the last part's
  backward (B or combined) on its stage."""
  per = {IDLE: 0.0, F: f, B: b, W: w, BW: b + w}
  cost = np.vectorize(per.get)(schedule.kind).astype(float) / schedule.chunks
  if head:
    cost += head * (_is_last_part(schedule) & np.isin(schedule.kind, (B, BW)))
  return cost


def _is_last_part(schedule: Schedule) -> np.ndarray:
  last = schedule.n_parts - 1
  return np.asarray([[schedule.kind[t, s] != IDLE and schedule.part(s, int(schedule.chunk[t, s])) == last
                      for s in range(schedule.stages)] for t in range(schedule.ticks)])


def simulate(schedule: Schedule, f: float = 1.0, b: float = 1.0, w: float = 1.0, transfer: float = 0.0,
             head: float = 0.0, vocab_parallel: bool = False) -> dict:
  """Step time, bubble fraction (idle over stages x time) and, per stage, the busy time and the
  most microbatch activation inputs held at once (from their arrival until their last backward
  use): exactly the executor's buffer slots."""
  cost = action_costs(schedule, f, b, w, 0.0 if vocab_parallel else head)
  buffers = plan_buffers(schedule)
  crosses = lambda send: np.isin(send, (UP, DOWN))  # LOCAL and NONE move nothing between stages
  sends = np.any(crosses(buffers.send_x) | crosses(buffers.send_g), axis=1)
  shared = np.zeros(schedule.ticks)
  if vocab_parallel:  # every stage scores its slice while the last part's forward runs
    shared = head / schedule.stages * np.any(_is_last_part(schedule) & (schedule.kind == F), axis=1)
  tick = cost.max(axis=1) + shared + transfer * sends
  time = float(tick.sum())
  busy = cost.sum(axis=0) + shared.sum()
  return {"schedule": schedule.name, "stages": schedule.stages, "microbatches": schedule.microbatches,
          "chunks": schedule.chunks, "ticks": schedule.ticks, "time": time,
          "bubble": float(1.0 - busy.mean() / time), "busy": busy.tolist(),
          "peak_stored": buffers.held.max(axis=0).tolist()}


def draw(schedule: Schedule, path: str, f: float = 1.0, b: float = 1.0, w: float = 1.0) -> None:
  """A timeline PNG: one row per stage, one box per action, coloured by kind, labelled with the
  microbatch (darker boxes: the second chunk)."""
  import matplotlib  # noqa: PLC0415 - only drawing needs it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  cost = action_costs(schedule, f, b, w)
  starts = np.concatenate([[0.0], np.cumsum(cost.max(axis=1))[:-1]])
  colours = {F: "#4c78a8", B: "#f58518", BW: "#f58518", W: "#54a24b"}
  fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * schedule.ticks), 0.45 * schedule.stages + 0.9))
  for t in range(schedule.ticks):
    for s in range(schedule.stages):
      k = int(schedule.kind[t, s])
      if k == IDLE:
        continue
      alpha = 1.0 if schedule.chunk[t, s] == 0 else 0.6
      ax.barh(s, cost[t, s], left=starts[t], color=colours[k], alpha=alpha, edgecolor="white", height=0.85)
      ax.text(starts[t] + cost[t, s] / 2, s, f"{ACTION_NAMES[k]}{schedule.microbatch[t, s]}", ha="center",
              va="center", fontsize=6, color="white")
  stats = simulate(schedule, f, b, w)
  ax.set_yticks(range(schedule.stages), [f"stage {s}" for s in range(schedule.stages)])
  ax.invert_yaxis()
  ax.set_xlabel("time (one stage's forward of one microbatch = 1)")
  ax.set_title(f"{schedule.name}: p={schedule.stages}, m={schedule.microbatches}, chunks={schedule.chunks}; "
               f"bubble {100 * stats['bubble']:.1f}%", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
