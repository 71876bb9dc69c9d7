"""Tile sizes of the Mosaic GPU grouped matmuls (parallel/experts/mgpu_matmul.py) on one Hopper GPU.

For each product of a SwiGLU expert layer's forward and backward (gate, up and down, and gate and
up as one [E, D, 2F] weight), every tiling of a grid is timed (calls queued back to back) against a
dense matmul of the same FLOPs, and its result checked against `mgpu_matmul.xla_kernels`
(`jax.lax.ragged_dot`) in float32 (relative Frobenius error; a tiling above 1e-2 is rejected).
Group sizes: `bench/moe_grouped_matmul.py`'s `skewed` (max/mean 1.77, the learned router's).
The table (best tiling per product) comes last; the JSON holds every tiling's time, and
`--configs_out` the best ones (product name -> `mgpu_matmul.TileConfig` fields).

  python bench/mgpu_sweep.py --out=mgpu_sweep.json --configs_out=mgpu_configs.json
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bench.timing import queued_call_seconds
from parallel.experts.mgpu_matmul import Configs, TileConfig, mosaic_kernels, xla_kernels

FLAGS = flags.FLAGS
flags.DEFINE_integer("experts", 16, "Groups E.")
flags.DEFINE_integer("d_model", 2048, "D.")
flags.DEFINE_integer("d_ff", 1408, "Expert width F.")
flags.DEFINE_integer("rows", 65536, "Rows M.")
flags.DEFINE_list("block_m", ["64", "128"], "Tile rows to try.")
flags.DEFINE_list("block_n", ["128", "256"], "Tile columns to try.")
flags.DEFINE_list("block_k", ["64"], "K step to try.")
flags.DEFINE_list("steps", ["3", "5"], "Pipeline stages to try.")
flags.DEFINE_list("grid_block_n", ["1", "8"], "Column-band widths to try.")
flags.DEFINE_list("products", [], "Only these products (e.g. gate_forward,gate_weight_grad); default all.")
flags.DEFINE_integer("repeats", 10, "Calls queued per timing.")
flags.DEFINE_string("out", "", "JSON of every timing.")
flags.DEFINE_string("configs_out", "", "JSON of the best tiling per product.")

KINDS = ("forward", "rows_grad", "weight_grad")


def skewed_sizes(m: int, e: int) -> np.ndarray:
  sizes = np.floor(m / e * np.linspace(0.23, 1.77, e)).astype(int)
  sizes[: m - sizes.sum()] += 1
  return sizes


def products(d: int, f: int) -> list[tuple[str, str, int, int]]:
  """(name, kernel, K, N): forward [M, K] x [E, K, N]; rows_grad [M, N] x [E, K, N]^T -> [M, K];
  weight_grad [M, K]^T [M, N] -> [E, K, N]."""
  out = []
  for kind in KINDS:
    out += [(f"gate_{kind}", kind, d, f), (f"gate_up_{kind}", kind, d, 2 * f), (f"down_{kind}", kind, f, d)]
  return out


def _operands(kind, m, e, k, n, key):
  ka, kb = jax.random.split(key)
  if kind == "forward":
    return jax.random.normal(ka, (m, k), jnp.bfloat16), jax.random.normal(kb, (e, k, n), jnp.bfloat16) / math.sqrt(k)
  if kind == "rows_grad":
    return jax.random.normal(ka, (m, n), jnp.bfloat16), jax.random.normal(kb, (e, k, n), jnp.bfloat16) / math.sqrt(n)
  return jax.random.normal(ka, (m, k), jnp.bfloat16), jax.random.normal(kb, (m, n), jnp.bfloat16) / math.sqrt(m)


def _reference(kind, a, b, sizes):
  return getattr(xla_kernels("highest"), kind)(a.astype(jnp.float32), b.astype(jnp.float32), sizes)


def _dense(kind, m, k, n, key):
  """A dense bf16 GEMM of the same FLOPs and the same contraction layout."""
  ka, kb = jax.random.split(key)
  if kind == "weight_grad":
    x, y = jax.random.normal(ka, (m, k), jnp.bfloat16), jax.random.normal(kb, (m, n), jnp.bfloat16)
    return jax.jit(lambda x, y: jnp.einsum("mk,mn->kn", x, y)), (x, y)
  x, y = jax.random.normal(ka, (m, k), jnp.bfloat16), jax.random.normal(kb, (k, n), jnp.bfloat16)
  return jax.jit(jnp.dot), (x, y)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def tilings() -> list[TileConfig]:
  grid = itertools.product(*(map(int, getattr(FLAGS, f)) for f in ("block_m", "block_n", "block_k", "steps",
                                                                      "grid_block_n")))
  return [TileConfig(*c) for c in grid]


def sweep_product(name, kind, k, n, sizes) -> dict:
  m, e = int(sizes.sum()), len(sizes)
  gs = jnp.asarray(sizes, jnp.int32)
  key = jax.random.key(hash(name) % 2**31)
  a, b = _operands(kind, m, e, k, n, key)
  want = jax.jit(lambda a, b: _reference(kind, a, b, gs))(a, b)
  flops = 2 * m * k * n
  dense_fn, dense_args = _dense(kind, m, k, n, key)
  dense_s = queued_call_seconds(dense_fn, *dense_args, repeats=FLAGS.repeats)
  rows = []
  for tile in tilings():
    fn = jax.jit(lambda a, b, tile=tile: getattr(mosaic_kernels(Configs(tile, tile, tile)), kind)(a, b, gs))
    row = {"tile": dataclasses.asdict(tile)}
    try:
      err = _rel(fn(a, b), want)
      row["error"] = err
      if err < 1e-2:
        row["us"] = queued_call_seconds(fn, a, b, repeats=FLAGS.repeats) * 1e6
    except Exception as exc:  # noqa: BLE001 - a tiling the kernel refuses (shared memory, divisibility)
      row["failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    rows.append(row)
  timed = [r for r in rows if "us" in r]
  best = min(timed, key=lambda r: r["us"]) if timed else None
  out = {"product": name, "kernel": kind, "k": k, "n": n, "rows": m, "dense_us": dense_s * 1e6,
         "dense_tflops": flops / dense_s / 1e12, "tilings": rows, "best": best}
  if best:
    out.update(best_us=best["us"], best_tflops=flops / best["us"] / 1e6, of_dense=dense_s * 1e6 / best["us"])
  return out


def main(_):
  sizes = skewed_sizes(FLAGS.rows, FLAGS.experts)
  results = []
  for name, kind, k, n in products(FLAGS.d_model, FLAGS.d_ff):
    if FLAGS.products and name not in FLAGS.products:
      continue
    results.append(sweep_product(name, kind, k, n, sizes))
    r = results[-1]
    print(f"{name}: dense {r['dense_us']:.0f} us, best {r.get('best_us', float('nan')):.0f} us "
          f"({len([t for t in r['tilings'] if 'us' in t])}/{len(r['tilings'])} tilings ran)", flush=True)
    if FLAGS.out:
      with open(FLAGS.out, "w") as fh:
        json.dump({"device": str(jax.devices()[0]), "group_sizes": sizes.tolist(), "results": results}, fh, indent=1)
  if FLAGS.configs_out:
    with open(FLAGS.configs_out, "w") as fh:
      json.dump({r["product"]: r["best"]["tile"] for r in results if r["best"]}, fh, indent=1)
  print(f"\n{FLAGS.experts} groups, {FLAGS.rows} rows (skewed), bf16; best tiling per product")
  print(f"{'product':<22}{'dense us':>10}{'mgpu us':>10}{'TFLOP/s':>9}{'of dense':>10}{'error':>10}  tiling")
  for r in results:
    if not r["best"]:
      print(f"{r['product']:<22}{r['dense_us']:>10.0f}  no tiling ran: {r['tilings'][0].get('failed', '')}")
      continue
    t = r["best"]["tile"]
    print(f"{r['product']:<22}{r['dense_us']:>10.0f}{r['best_us']:>10.0f}{r['best_tflops']:>9.0f}{r['of_dense']:>10.1%}"
          f"{r['best']['error']:>10.1e}  m{t['block_m']} n{t['block_n']} k{t['block_k']} s{t['steps']} "
          f"g{t['grid_block_n']}")


if __name__ == "__main__":
  app.run(main)
