"""How fast each product of a batch-1 decode step streams its weight, per split of its contraction.

A decode step multiplies two rows (the engine's one row and its spare) by every weight; cuBLAS
tiles such a product over its output columns, and `models.layers.split_k_product` cuts the
contraction into parts run as one batched product (`model.decode_split_k`). For each product of
the `1b` preset (q/k/v fused, output, gate/up fused, down) and each split: one jitted call runs
the product over 16 distinct weights (a step's 16 layers) with float32 partial sums, profiled; the
table gives the GEMM kernels' microseconds per product and the bytes of the weight over them.

  PYTHONPATH=. python bench/split_k_probe.py --out=split_k_probe.json
"""

from __future__ import annotations

import argparse
import json

# (name, contraction, outputs) of the `1b` preset's products, as the fused layout runs them
PRODUCTS = (("qkv", 2048, 4096), ("o", 2048, 2048), ("gate_up", 2048, 11264), ("down", 5632, 2048))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--splits", default="1,2,4,8,16")
  ap.add_argument("--rows", type=int, default=2)
  ap.add_argument("--layers", type=int, default=16)
  ap.add_argument("--out", required=True)
  args = ap.parse_args()

  from parallel.xla_flags import apply_default_flags
  apply_default_flags(serving=True)
  import jax
  import jax.numpy as jnp

  from bench.serve_profile import profile
  from models.layers import split_k_product

  rows = []
  for name, k, n in PRODUCTS:
    keys = jax.random.split(jax.random.key(k + n), 2)
    w = jax.random.normal(keys[0], (args.layers, k, n), jnp.bfloat16)
    x = jax.random.normal(keys[1], (args.layers, args.rows, k), jnp.bfloat16)
    for s in [int(v) for v in args.splits.split(",")]:
      fn = jax.jit(lambda x, w, s=s: [split_k_product(x[i], w[i], 1, s, jnp.float32) for i in range(args.layers)])
      jax.block_until_ready(fn(x, w))
      row = {"product": name, "k": k, "n": n, "splits": s}
      if jax.default_backend() == "gpu":
        p = profile(lambda: fn(x, w), args.layers, 4)
        gemm_us = 1e3 * p["by_kind_ms"].get("gemm", 0.0)
        row.update(gemm_us=gemm_us, total_us=1e3 * p["kernel_ms_per_step"], kernels=p["kernels_per_step"],
                   gb_per_s=k * n * 2 / gemm_us / 1e3 if gemm_us else 0.0, top=p["kernels"][:2])
      rows.append(row)
      print(json.dumps({k: v for k, v in row.items() if k != "top"}), flush=True)

  with open(args.out, "w") as f:
    json.dump({"device_kind": jax.devices()[0].device_kind, "jax": jax.__version__, "args": vars(args),
               "rows": rows}, f, indent=2)
  print(f"\nsplit_k_probe on {jax.devices()[0].device_kind}: GEMM us per product (GB/s of its weight)")
  splits = sorted({r["splits"] for r in rows})
  print(f"{'product':<8} " + " ".join(f"{'split ' + str(s):>16}" for s in splits))
  for name, _, _ in PRODUCTS:
    cells = [r for r in rows if r["product"] == name]
    print(f"{name:<8} " + " ".join(f"{r.get('gemm_us', 0):7.2f} ({r.get('gb_per_s', 0):5.0f})" for r in cells))


if __name__ == "__main__":
  main()
