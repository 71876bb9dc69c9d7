"""JAX 0.11's XLA:CPU crash on a `switch` that mixes full-range and partial updates (see
bench/xla_cpu_switch_crash.py): the form the ring ops use compiles and gives the right value.
Only meaningful on JAX 0.11 (0.10 and 0.12 compile both forms); skipped elsewhere."""

import jax
import pytest

from bench.xla_cpu_switch_crash import run

pytestmark = pytest.mark.skipif(not jax.__version__.startswith("0.11."), reason="the crash is JAX 0.11's")


def test_the_ring_form_compiles_where_the_full_range_update_crashes():
  rc, out = run(full_range=False)
  assert (rc, out) == (0, "24.0")  # device 0: 8 x 2.0 (whole value); device 1: 4 x 2.0 (partial update)
  rc_raw, _ = run(full_range=True)
  print(f"full-range update form: exit status {rc_raw}")  # -11 on 0.11.2
