"""Run reporting: throughput and MFU, JSONL and TensorBoard event files, human-readable lines."""

from __future__ import annotations

import json
import os
import time

import jax

# Dense bf16 peak per device (FLOP/s), by device kind prefix.
_PEAK_FLOPS = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12, "TPU v5p": 459e12,
               "TPU v5": 197e12, "TPU v4": 275e12}


def peak_flops_per_device() -> float | None:
  kind = jax.devices()[0].device_kind
  for prefix, flops in _PEAK_FLOPS.items():
    if kind.startswith(prefix):
      return flops
  return None


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Throughput:
  """Step time, tokens/s and MFU between two finished steps.

  `reset(step)` and `measure(step)` are called when `step` has finished on the device, so the
  interval covers exactly the steps in between, however far ahead the host has dispatched.
  MFU = tokens/s x model FLOPs per token / (peak FLOP/s per device x devices); it is reported
  where the peak is known (`peak_flops_per_device`, or `peak_flops` given here).
  """

  def __init__(self, tokens_per_step: int, flops_per_token: float, *, peak_flops: float | None = None,
               n_devices: int | None = None):
    self.tokens_per_step = tokens_per_step
    self.flops_per_token = flops_per_token
    self.peak = peak_flops if peak_flops is not None else peak_flops_per_device()
    self.n_devices = n_devices if n_devices is not None else jax.device_count()
    self.reset(0)

  def reset(self, step: int) -> None:
    self._t, self._step = time.perf_counter(), step

  def measure(self, step: int) -> dict[str, float]:
    """Rates since the last reset/measure; empty if no step finished in between."""
    now, steps = time.perf_counter(), step - self._step
    elapsed, self._t, self._step = now - self._t, now, step
    if steps <= 0:
      return {}
    step_time = elapsed / steps
    tokens_per_s = self.tokens_per_step / step_time
    out = {"step_time_s": step_time, "tokens_per_s": tokens_per_s}
    if self.peak:
      out["mfu"] = tokens_per_s * self.flops_per_token / (self.peak * self.n_devices)
    return out


def _read_records(path: str) -> list[str]:
  with open(path) as f:
    return [line for line in f if line.strip()]


class MetricsWriter:
  """Appends one JSON object per line to `metrics.jsonl` and mirrors scalars to TensorBoard.

  `resume_step`: the step a resumed run starts after. Records of later steps (written by the run
  that was killed after its last checkpoint, and about to be recomputed) are dropped from
  `metrics.jsonl`, and TensorBoard is told to discard its events from those steps on, so every
  step keeps exactly one record.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
      kept = [line for line in _read_records(path) if _step_of(line) is not None and _step_of(line) <= resume_step]
      with open(path + ".tmp", "w") as f:
        f.writelines(kept)
      os.replace(path + ".tmp", path)
    self._jsonl = open(path, "a", buffering=1)
    from tensorboardX import SummaryWriter  # only the writing process needs it
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                             purge_step=resume_step + 1 if resume_step > 0 else None)

  def write(self, step: int, metrics: dict[str, float], split: str = "train") -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"split": split, "step": step, **metrics}) + "\n")
    for key, value in metrics.items():
      self._tb.add_scalar(f"{split}/{key}", value, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _step_of(line: str) -> int | None:
  """The step of one JSONL record; None for a line cut short by a kill."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None
