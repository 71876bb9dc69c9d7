"""Flash-attention kernels on the zigzag ring's block shapes: cuDNN against tokamax (Pallas Mosaic GPU).

Forward + backward of one call per shape (bf16, 16 heads, 8 KV heads, head dim 128), random
inputs and cotangent; the rate counts the backward as 2.5x the forward and a causal call as half
the pairs. Needs `tokamax` (and its dependencies) on a Hopper GPU. A table is printed last.

  PYTHONPATH=. python bench/ring_kernels.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app

from bench.timing import median_call_seconds

HEADS, KV_HEADS, HEAD_DIM = 16, 8, 128
# (query rows, key rows, causal): the ring's half blocks, its own block, a whole 16K block, and one
# 128K-token causal call (the reference's kind).
SHAPES = [(8192, 16384, False), (16384, 8192, False), (16384, 16384, True), (16384, 16384, False),
          (131072, 131072, True)]


def timed(implementation: str, lq: int, lk: int, causal: bool) -> tuple[float, float]:
  """(seconds, TFLOP/s) of forward + backward."""
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (1, lq, HEADS, HEAD_DIM), jnp.bfloat16)
  k = jax.random.normal(ks[1], (1, lk, KV_HEADS, HEAD_DIM), jnp.bfloat16)
  v = jax.random.normal(ks[2], (1, lk, KV_HEADS, HEAD_DIM), jnp.bfloat16)
  do = jax.random.normal(ks[3], (1, lq, HEADS, HEAD_DIM), jnp.bfloat16)
  if implementation == "cudnn":
    attend = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
  else:
    import tokamax  # noqa: PLC0415 - GPU only, optional

    attend = lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
  fn = jax.jit(lambda q, k, v: jax.vjp(attend, q, k, v)[1](do))
  t = median_call_seconds(fn, q, k, v, repeats=5)
  return t, 3.5 * 4 * lq * lk * HEADS * HEAD_DIM * (0.5 if causal else 1.0) / t / 1e12


def main(argv):
  del argv
  rows = []
  for lq, lk, causal in SHAPES:
    for implementation in ("cudnn", "mosaic"):
      t, rate = timed(implementation, lq, lk, causal)
      rows.append((implementation, lq, lk, causal, t, rate))
      print(f"RESULT {implementation:7s} q={lq:6d} k={lk:6d} causal={causal!s:5s} {1e3 * t:8.2f} ms {rate:6.0f} TFLOP/s",
            flush=True)
  print(f"\n{'kernel':<8}{'q rows':>8}{'k rows':>8}{'causal':>8}{'ms':>10}{'TFLOP/s':>9}")
  for implementation, lq, lk, causal, t, rate in rows:
    print(f"{implementation:<8}{lq:>8}{lk:>8}{causal!s:>8}{1e3 * t:>10.2f}{rate:>9.0f}")


if __name__ == "__main__":
  app.run(main)
