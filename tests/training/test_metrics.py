"""Throughput counts the steps that finished between two calls, however far ahead dispatch runs."""

import time

from training.metrics import Throughput


def test_throughput_counts_finished_steps():
  meter = Throughput(tokens_per_step=1000, flops_per_token=1.0)
  meter.reset(5)
  assert meter.measure(5) == {}  # nothing finished since the reset: no rate, not a huge one
  time.sleep(0.05)
  out = meter.measure(15)
  assert 0.005 <= out["step_time_s"] < 0.05  # 10 steps in >= 50 ms
  assert abs(out["tokens_per_s"] * out["step_time_s"] - 1000) < 1e-6
  time.sleep(0.02)
  assert 0.02 <= meter.measure(16)["step_time_s"] < 0.5  # the interval restarts at each measure
