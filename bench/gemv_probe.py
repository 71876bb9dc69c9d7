"""How fast the GPU streams a decode step's weights through skinny matrix products, per library.

For each of the `1b` preset's projection shapes (K -> N) and each row count M, a stack of 16
distinct bf16 weights (one per layer, so nothing stays in L2) is multiplied by an [M, K] input,
layer after layer, once through XLA (one jitted program of 16 `jnp.dot`s over 16 separate weight
arrays, as the unrolled decode loop runs them) and once through PyTorch (`torch.matmul` replayed from a CUDA graph, so launches cost nothing).
Prints the weights' bytes over the time per product (GB/s) for both, and the bandwidth of a plain
device copy measured in the same run (bytes read + written), so the fraction is of this GPU.

  PYTHONPATH=. python bench/gemv_probe.py --out=gemv_probe.json
"""

from __future__ import annotations

import argparse
import json
import time

SHAPES = {"q/o": (2048, 2048), "k/v": (2048, 1024), "gate/up": (2048, 5632), "down": (5632, 2048),
          "gate+up": (2048, 11264), "head": (2048, 32000)}
LAYERS = 16


def time_jax(m: int, k: int, n: int, repeats: int) -> float:
  import jax
  import jax.numpy as jnp

  w = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) for i in range(LAYERS)]
  x = jax.random.normal(jax.random.key(LAYERS), (m, k), jnp.bfloat16)

  @jax.jit
  def run(x, w):  # separate arrays: a slice of one stacked array could be copied before its product
    return [jnp.dot(x, wi) for wi in w]

  jax.block_until_ready(run(x, w))
  t0 = time.perf_counter()
  for _ in range(repeats):
    out = run(x, w)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / repeats / LAYERS


def time_torch(m: int, k: int, n: int, repeats: int) -> float:
  import torch

  w = torch.randn(LAYERS, k, n, device="cuda", dtype=torch.bfloat16)
  x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
  outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]

  def step():
    for i in range(LAYERS):
      torch.matmul(x, w[i], out=outs[i])

  s = torch.cuda.Stream()
  with torch.cuda.stream(s):
    step()
  torch.cuda.synchronize()
  graph = torch.cuda.CUDAGraph()
  with torch.cuda.graph(graph):
    step()
  graph.replay()
  torch.cuda.synchronize()
  t0 = time.perf_counter()
  for _ in range(repeats):
    graph.replay()
  torch.cuda.synchronize()
  return (time.perf_counter() - t0) / repeats / LAYERS


def copy_bandwidth() -> float:
  import jax
  import jax.numpy as jnp

  a = jnp.ones((1 << 30,), jnp.bfloat16)  # 2 GiB
  f = jax.jit(lambda a: a * 2)
  f(a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(10):
    b = f(a)
  b.block_until_ready()
  return 2 * a.nbytes / ((time.perf_counter() - t0) / 10)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--rows", default="1,2,8,32")
  ap.add_argument("--repeats", type=int, default=50)
  ap.add_argument("--out", required=True)
  args = ap.parse_args()
  bw = copy_bandwidth()
  rows = []
  for name, (k, n) in SHAPES.items():
    for m in map(int, args.rows.split(",")):
      nbytes = 2 * k * n
      tj = time_jax(m, k, n, args.repeats)
      tt = time_torch(m, k, n, args.repeats)
      rows.append({"shape": name, "k": k, "n": n, "m": m, "xla_us": tj * 1e6, "torch_us": tt * 1e6,
                   "xla_gbs": nbytes / tj / 1e9, "torch_gbs": nbytes / tt / 1e9})
  with open(args.out, "w") as f:
    json.dump({"copy_gbs": bw / 1e9, "rows": rows}, f, indent=1)
  print(f"device copy (read + write): {bw / 1e9:,.0f} GB/s")
  print(f"{'shape':>8} {'K':>5} {'N':>6} {'M':>3} | {'XLA us':>7} {'GB/s':>6} {'%':>4} | {'torch us':>8} {'GB/s':>6} {'%':>4}")
  for r in rows:
    print(f"{r['shape']:>8} {r['k']:>5} {r['n']:>6} {r['m']:>3} | {r['xla_us']:7.1f} {r['xla_gbs']:6.0f} "
          f"{100 * r['xla_gbs'] * 1e9 / bw:4.0f} | {r['torch_us']:8.1f} {r['torch_gbs']:6.0f} "
          f"{100 * r['torch_gbs'] * 1e9 / bw:4.0f}")


if __name__ == "__main__":
  main()
