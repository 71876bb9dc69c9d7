"""The compute side of ring attention on one GPU: one device's ring pass against one cuDNN call.

One device's queries (L tokens) meet N key/value blocks of L tokens each, every block handled as a
ring step handles it (`parallel.attention.ring.block_fwd` / `block_bwd`: a cuDNN flash-attention
block, the float32 LSE merge, and the backward from the final output and LSE), with no
communication. The reference is one monolithic cuDNN call:

  full    the same L queries against all N x L keys, no mask; both do the same FLOPs.
  causal  zigzag: the device holds chunks i and 2N-1-i of the N x L sequence; the reference is one
          causal cuDNN call over the whole sequence, whose FLOPs are N times one device's share,
          so rates are compared (FLOPs per second), and outputs on the device's rows.

Forward+backward time of each, the ratio of rates (ring / monolithic), and the largest relative
error of the output and dq rows against the reference. A table is printed last; JSON with --out.

  python bench/ring_block.py --lengths=16384,32768 --blocks=2,4,8 --out=ring_block.json
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
from absl import app, flags

from parallel.attention.layout import device_tokens
from parallel.attention.ring import Ring, block_kernels
from bench.compare import fwd_bwd, rel_err, ring_pass
from bench.timing import median_call_seconds

FLAGS = flags.FLAGS
flags.DEFINE_list("lengths", ["16384", "32768"], "Tokens per device (L).")
flags.DEFINE_list("blocks", ["2", "4", "8"], "Key/value blocks per ring pass (N).")
flags.DEFINE_list("masks", ["full", "causal"], "full (no mask) and/or causal (zigzag).")
flags.DEFINE_integer("heads", 16, "Query heads.")
flags.DEFINE_integer("kv_heads", 8, "Key/value heads.")
flags.DEFINE_integer("head_dim", 128, "Head dimension.")
flags.DEFINE_integer("repeats", 5, "Timed runs (after one warm-up); the median is reported.")
flags.DEFINE_string("implementation", "cudnn", "cudnn (GPU), or xla to try the script on a CPU at small sizes.")
flags.DEFINE_integer("group", 1, "Experiment: arriving blocks per cuDNN call after my own (1: the ring as it runs).")
flags.DEFINE_string("out", "", "Write the results as JSON here.")


def measure(length: int, n: int, causal: bool) -> dict:
  h, kh, d = FLAGS.heads, FLAGS.kv_heads, FLAGS.head_dim
  total = n * length
  keys = jax.random.split(jax.random.key(length + n), 4)
  seq_q = jax.random.normal(keys[0], (1, total, h, d), jnp.bfloat16)
  seq_k = jax.random.normal(keys[1], (1, total, kh, d), jnp.bfloat16)
  seq_v = jax.random.normal(keys[2], (1, total, kh, d), jnp.bfloat16)
  layout = "zigzag" if causal else "contiguous"
  me = 0
  rows = device_tokens(layout, total, n)  # [n, L]: original indices of each device's tokens
  take = lambda x, r: jnp.take(x, jnp.asarray(r), axis=1)
  ks = jnp.stack([take(seq_k, rows[i]) for i in range(n)])
  vs = jnp.stack([take(seq_v, rows[i]) for i in range(n)])
  # Full attention: my L queries see every key (a fresh random query block, no mask).
  q = take(seq_q, rows[me]) if causal else jax.random.normal(keys[3], (1, length, h, d), jnp.bfloat16)
  impl = FLAGS.implementation
  ring = Ring(axis="unused", size=n, stride=1, layout=layout, scale=d ** -0.5, kernels=block_kernels(impl),
              causal=causal)
  cot = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
  ring_fn = jax.jit(lambda q, ks, vs: fwd_bwd(lambda q, ks, vs: ring_pass(ring, me, rows, q, ks, vs, FLAGS.group),
                                              q, ks, vs, cot))
  mono = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)
  if causal:  # the whole sequence. Timed with a random cotangent on every row, as every device's
    # ring pass has on its rows; checked with mine on my rows and zero elsewhere, so that the
    # gradients of my rows are those of the ring pass. (Timing the zero-elsewhere one would
    # flatter the monolithic call: H100s run faster on zeros; both times are reported.)
    mono_cot = jnp.zeros_like(seq_q).at[:, jnp.asarray(rows[me])].set(cot)
    timed_cot = jax.random.normal(keys[3], seq_q.shape, jnp.bfloat16).at[:, jnp.asarray(rows[me])].set(cot)
    mono_args = (seq_q, seq_k, seq_v)
  else:
    mono_cot = timed_cot = cot
    flat = lambda x: x.transpose(1, 0, 2, 3, 4).reshape(1, total, kh, d)  # blocks back in sequence order
    mono_args = (q, flat(ks), flat(vs))
  mono_fn = jax.jit(lambda q, k, v, cot: fwd_bwd(mono, q, k, v, cot))

  t_ring = median_call_seconds(ring_fn, q, ks, vs, repeats=FLAGS.repeats)
  t_mono = median_call_seconds(mono_fn, *mono_args, timed_cot, repeats=FLAGS.repeats)
  t_mono_zeros = median_call_seconds(mono_fn, *mono_args, mono_cot, repeats=FLAGS.repeats) if causal else t_mono
  (o_ring, dq_ring), (o_mono, dq_mono) = ring_fn(q, ks, vs)[:2], mono_fn(*mono_args, mono_cot)[:2]
  if causal:
    o_mono, dq_mono = take(o_mono, rows[me]), take(dq_mono, rows[me])
  # One device's share of the forward FLOPs (causal: 1/N of the sequence's); backward ~2.5x.
  flops_fwd = 4 * length * total * h * d * (0.5 if causal else 1.0)
  ratio = (t_mono / (n if causal else 1)) / t_ring
  return {"tokens_per_device": length, "blocks": n, "mask": "causal zigzag" if causal else "full",
          "ring_ms": 1e3 * t_ring, "monolithic_ms": 1e3 * t_mono, "ratio": ratio,
          "monolithic_ms_zero_cotangent_elsewhere": 1e3 * t_mono_zeros,
          "ratio_against_zero_cotangent_elsewhere": (t_mono_zeros / (n if causal else 1)) / t_ring,
          "ring_tflops": 3.5 * flops_fwd / t_ring / 1e12, "out_rel_err": rel_err(o_ring, o_mono),
          "dq_rel_err": rel_err(dq_ring, dq_mono)}


def main(argv):
  del argv
  print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
  rows = []
  for causal in [m == "causal" for m in FLAGS.masks]:
    for length in map(int, FLAGS.lengths):
      for n in map(int, FLAGS.blocks):
        r = measure(length, n, causal)
        rows.append(r)
        print(f"RESULT {r['mask']:<13} L={length:<6} N={n} ring {r['ring_ms']:8.1f} ms  mono {r['monolithic_ms']:8.1f} ms  "
              f"ratio {r['ratio']:.3f} (zeros elsewhere {r['ratio_against_zero_cotangent_elsewhere']:.3f})  "
              f"err {r['out_rel_err']:.2e}", flush=True)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, f, indent=2)
  print(f"\n{'mask':<14}{'L':>7}{'N':>3}{'ring ms':>10}{'mono ms':>10}{'ratio':>8}{'TFLOP/s':>9}{'out err':>10}{'dq err':>10}")
  for r in rows:
    dq = f"{r['dq_rel_err']:.1e}"
    print(f"{r['mask']:<14}{r['tokens_per_device']:>7}{r['blocks']:>3}{r['ring_ms']:>10.1f}{r['monolithic_ms']:>10.1f}"
          f"{r['ratio']:>8.3f}{r['ring_tflops']:>9.0f}{r['out_rel_err']:>10.1e}{dq:>10}")


if __name__ == "__main__":
  app.run(main)
