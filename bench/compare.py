"""What the attention benchmarks share besides timing: one forward+backward call and the error
of a result against its reference."""

from __future__ import annotations

import jax
import numpy as np


def fwd_bwd(fn, q, k, v, cot):
  """(output, dq, dk, dv) of `fn(q, k, v)` for the cotangent `cot` of the output."""
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(cot))


def rel_err(a, b) -> float:
  """Relative Frobenius error of `a` against `b`, in float32."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))
