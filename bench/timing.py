"""Steady-state step timing shared by shardlab's benchmark and the PyTorch peer.

Each step is queued before the host waits for the one before it, as `train.py` runs: the device
never idles on the host, and the time between two steps finishing is the device's step time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TypeVar

Handle = TypeVar("Handle")


def steady_step_times(dispatch: Callable[[], Handle], wait: Callable[[Handle], None], steps: int,
                      windows: int) -> tuple[list[float], Handle]:
  """Mean seconds per step in each of `windows` consecutive windows of `steps` steps, and the
  handle of the one step left queued at the end (wait on it for final values or memory).

  `dispatch()` queues one step and returns something `wait` blocks on until that step is done.
  """
  done = dispatch()
  wait(done)
  finished = [time.perf_counter()]  # the first timed step starts now, then each entry is a step done
  queued = dispatch()
  for _ in range(steps * windows):
    done, queued = queued, dispatch()
    wait(done)
    finished.append(time.perf_counter())
  times = [(finished[(w + 1) * steps] - finished[w * steps]) / steps for w in range(windows)]
  return times, queued


def summarize(times: list[float]) -> dict[str, float]:
  """The reported step time is the median window's mean; min and max show the spread."""
  return {"step_s": statistics.median(times), "step_s_min": min(times), "step_s_max": max(times)}


def median_call_seconds(fn: Callable, *args, repeats: int) -> float:
  """Median wall time of `fn(*args)` (a JAX function) over `repeats` calls after one warm-up
  (which compiles it), each waited on until its results are ready."""
  import jax  # noqa: PLC0415 - the PyTorch peer imports this module without JAX

  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def queued_call_seconds(fn: Callable, *args, repeats: int, runs: int = 3) -> float:
  """Seconds per call of `fn(*args)` (a JAX function) over `repeats` calls queued back to back
  (the host does not wait between them, so launch costs overlap the device's work), after one
  warm-up call; the median of `runs` such batches. For programs of microseconds, where waiting on
  every call (`median_call_seconds`) would time the host."""
  import jax  # noqa: PLC0415 - the PyTorch peer imports this module without JAX

  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    jax.block_until_ready([fn(*args) for _ in range(repeats)])
    times.append((time.perf_counter() - t) / repeats)
  return statistics.median(times)
