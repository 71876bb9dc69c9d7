"""One decode step's attention: the one-kernel Pallas version (parallel/attention/decode_kernel.py)
against XLA's (models.cache.attend_with_cache), at the `1b` preset's heads, in bf16.

For each batch: 16 layers' worth of distinct caches of `--span` positions (the engine's window),
each row holding a random number of valid positions in [span/2, span); one jitted call runs the
attention of all 16 layers (as a step does), timed queued back to back. Both results are compared
with a float32 XLA reference (relative Frobenius error). Prints a table last; writes JSON.

  PYTHONPATH=. python bench/decode_attention.py --out=decode_attention.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batches", default="2,32", help="rows per step (batch-1 decode runs 2: the spare slot)")
  ap.add_argument("--span", type=int, default=512)
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--kv_heads", type=int, default=8)
  ap.add_argument("--head_dim", type=int, default=128)
  ap.add_argument("--layers", type=int, default=16)
  ap.add_argument("--splits", default="4,8,16", help="parts of the positions to try (0: the kernel's default)")
  ap.add_argument("--block_s", default="0", help="kernel position blocks to try (0: the largest for a part)")
  ap.add_argument("--warps", default="4", help="kernel warps to try")
  ap.add_argument("--repeats", type=int, default=50)
  ap.add_argument("--interpret", action="store_true", help="run the kernel in the Pallas interpreter (CPU check)")
  ap.add_argument("--out", required=True)
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp

  from bench.timing import queued_call_seconds
  from models.cache import attend_with_cache
  from parallel.attention.decode_kernel import decode_attention

  h, kv, d, s, n = args.heads, args.kv_heads, args.head_dim, args.span, args.layers
  bf16, f32 = jnp.bfloat16, jnp.float32
  err = lambda a, b: float(jnp.linalg.norm((a.astype(f32) - b).ravel()) / jnp.linalg.norm(b.ravel()))
  rows = []
  for b in [int(x) for x in args.batches.split(",")]:
    keys = jax.random.split(jax.random.key(b), 5)
    q = jax.random.normal(keys[0], (n, b, h, d), bf16)
    kn, vn = (jax.random.normal(k, (n, b, kv, d), bf16) for k in keys[1:3])
    ck, cv = (jax.random.normal(k, (n, b, kv, s, d), bf16) for k in keys[3:5])
    lengths = jnp.asarray(np.random.default_rng(b).integers(s // 2, s, b), jnp.int32)
    read_bytes = 2 * n * int(lengths.sum()) * kv * d * 2  # the valid positions of k and v, bf16

    def xla(q, kn, vn, ck, cv, dtype=bf16):
      return jnp.stack([attend_with_cache(q[i][:, None].astype(dtype), kn[i][:, None].astype(dtype),
                                          vn[i][:, None].astype(dtype), ck[i].astype(dtype), cv[i].astype(dtype),
                                          lengths)[:, 0] for i in range(n)])

    want = jax.jit(lambda *a: xla(*a, dtype=f32))(q, kn, vn, ck, cv)
    xla_fn = jax.jit(xla)
    got = xla_fn(q, kn, vn, ck, cv)
    t = queued_call_seconds(xla_fn, q, kn, vn, ck, cv, repeats=args.repeats)
    rows.append({"batch": b, "impl": "xla", "us_per_layer": 1e6 * t / n, "rel_err_vs_f32": err(got, want),
                 "gb_per_s": read_bytes / t / 1e9})
    # The kernel reads each layer's keys and values in place from the stacked caches (as the engine).
    configs = [(p, bs, w) for p in args.splits.split(",") for bs in args.block_s.split(",") for w in args.warps.split(",")]
    for splits, block_s, warps in [tuple(int(x) for x in c) for c in configs]:
      fn = jax.jit(lambda q, kn, vn, ck, cv, splits=splits, block_s=block_s, warps=warps: jnp.stack([
          decode_attention(q[i], kn[i], vn[i], ck, cv, lengths, layer=jnp.int32(i), splits=splits or None,
                           block_s=block_s or None, num_warps=warps, interpret=args.interpret) for i in range(n)]))
      got = fn(q, kn, vn, ck, cv)
      t = queued_call_seconds(fn, q, kn, vn, ck, cv, repeats=args.repeats)
      rows.append({"batch": b, "impl": f"kernel splits={splits} block_s={block_s} warps={warps}",
                   "us_per_layer": 1e6 * t / n, "rel_err_vs_f32": err(got, want), "gb_per_s": read_bytes / t / 1e9})
    print(f"batch {b} done", flush=True)

  with open(args.out, "w") as f:
    json.dump({"device_kind": jax.devices()[0].device_kind, "jax": jax.__version__, "args": vars(args),
               "rows": rows}, f, indent=2)
  print(f"\ndecode attention, {h} heads over {kv} kv heads of {d}, span {s}, on {jax.devices()[0].device_kind}")
  print(f"{'rows':>5} {'implementation':<38} {'us/layer':>9} {'GB/s':>7} {'rel err vs f32':>15}")
  for r in rows:
    print(f"{r['batch']:>5} {r['impl']:<38} {r['us_per_layer']:9.2f} {r['gb_per_s']:7.0f} {r['rel_err_vs_f32']:15.2e}")


if __name__ == "__main__":
  main()
