"""Packed documents in one device's ring pass on one GPU: the fused route (`documents.py`) against
one cuDNN call per document.

As `ring_block.py` (causal, zigzag, device 0 of N, no communication), with the N x L sequence
packed from documents of the given lengths. The device's pass runs its blocks as a ring step
does with segment ids: `--implementation=cudnn` takes the fused route (a padding-masked cuDNN call
for the document running across a block boundary; the own block as one packed-segment call, or
with more documents than `documents.packed_slots` allows, in pieces or tiles of `--tile` rows);
`xla` the masked XLA blocks the ring used before. The reference is the ideal: every document as
its own batch row, in one causal cuDNN call per group of rows padded to the same power of two,
with the documents' lengths, which skips the padding.

Both are timed forward+backward with a random cotangent on every row. Rates are visible FLOPs
(4 x H x D per visible query-key pair, x3.5 for forward+backward) per second; the ratio is the
ring's rate over the reference's. Errors: the device's output and dq rows against the reference
(dq of a row depends only on its own cotangent, so the two compare directly). Table last; JSON
with --out.

  python bench/ring_documents.py --docs=1000,4000,pareto --blocks=2,8 --out=ring_documents.json
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bench.compare import fwd_bwd, rel_err, ring_pass
from bench.timing import median_call_seconds
from parallel.attention import documents
from parallel.attention.layout import device_tokens
from parallel.attention.ring import Ring, block_kernels

FLAGS = flags.FLAGS
flags.DEFINE_integer("length", 16384, "Tokens per device (L).")
flags.DEFINE_list("blocks", ["2", "8"], "Key/value blocks per ring pass (N).")
flags.DEFINE_list("docs", ["1000", "4000", "pareto"],
                  "Document lengths: a fixed length, or `pareto` (long-tailed, mean about 1,500, seeded).")
flags.DEFINE_integer("tile", documents.TILE, "Rows per own-block tile (documents.TILE).")
flags.DEFINE_integer("max_documents", documents.MAX_DOCUMENTS,
                     "documents.MAX_DOCUMENTS: at most this many documents per own block in one packed call "
                     "(0: tiles only).")
flags.DEFINE_bool("compare_xla", False, "Also run the masked XLA blocks (untimed) and report the error against them.")
flags.DEFINE_integer("heads", 16, "Query heads.")
flags.DEFINE_integer("kv_heads", 8, "Key/value heads.")
flags.DEFINE_integer("head_dim", 128, "Head dimension.")
flags.DEFINE_integer("repeats", 5, "Timed runs (after one warm-up); the median is reported.")
flags.DEFINE_string("implementation", "cudnn", "cudnn (the fused route), xla (masked blocks), or xla_kernels.")
flags.DEFINE_string("out", "", "Write the results as JSON here.")


def doc_lengths(spec: str, total: int) -> np.ndarray:
  """Lengths of the documents packing `total` tokens (the last one cut to fit)."""
  if spec == "pareto":
    rng = np.random.default_rng(0)
    lengths = (500 * (1 + rng.pareto(1.5, size=total))).astype(int)
  else:
    lengths = np.full(total, int(spec))
  ends = np.cumsum(lengths)
  n = int(np.searchsorted(ends, total)) + 1
  lengths = lengths[:n].copy()
  lengths[-1] -= ends[n - 1] - total
  return lengths


def measure(length: int, n: int, spec: str) -> dict:
  h, kh, d = FLAGS.heads, FLAGS.kv_heads, FLAGS.head_dim
  total = n * length
  lens = doc_lengths(spec, total)
  seg = np.repeat(np.arange(1, lens.size + 1), lens)
  pos = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
  keys = jax.random.split(jax.random.key(length + n), 4)
  seq_q, seq_k, seq_v = (jax.random.normal(kk, (1, total, hh, d), jnp.bfloat16)
                         for kk, hh in zip(keys[:3], (h, kh, kh)))
  cot = jax.random.normal(keys[3], seq_q.shape, jnp.bfloat16)
  me, rows = 0, device_tokens("zigzag", total, n)
  take = lambda x, r: jnp.take(x, jnp.asarray(r), axis=1)
  ks, vs = (jnp.stack([take(x, rows[i]) for i in range(n)]) for x in (seq_k, seq_v))
  ring = Ring(axis="unused", size=n, stride=1, layout="zigzag", scale=d ** -0.5,
              kernels=block_kernels(FLAGS.implementation))

  def pass_of(ring):  # the device's pass, forward and backward, jitted
    pass_fn = lambda q, ks, vs: ring_pass(ring, me, rows, q, ks, vs, segments=seg[rows])
    return jax.jit(lambda q, ks, vs: fwd_bwd(pass_fn, q, ks, vs, take(cot, rows[me])))

  ring_fn = pass_of(ring)

  # The reference: each document its own batch row, rows grouped by the power of two (at least
  # 1,024) their document fits, padded to it, with the documents' lengths: one cuDNN call a group.
  width = np.maximum(1024, 2 ** np.ceil(np.log2(lens)).astype(int))
  doc = np.repeat(np.arange(lens.size), lens)
  groups = []  # (width, documents of that width, each token's place in the group's rows or -1)
  for w in np.unique(width):
    members = np.flatnonzero(width == w)
    row = np.full(lens.size, -1)
    row[members] = np.arange(members.size)
    place = np.where(row[doc] >= 0, row[doc] * w + pos, -1)
    groups.append((int(w), members, place))
  impl = "cudnn" if FLAGS.implementation == "cudnn" else "xla"

  def to_groups(x):  # [1, total, ...] -> per group [documents, width, ...]
    return [jnp.zeros((m.size * w, *x.shape[2:]), x.dtype).at[pl[pl >= 0]].set(x[0, pl >= 0])
            .reshape(m.size, w, *x.shape[2:]) for w, m, pl in groups]

  def mono(qs, ks_, vs_):
    return [jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=jnp.asarray(lens[m], jnp.int32),
                                         key_value_seq_lengths=jnp.asarray(lens[m], jnp.int32), implementation=impl)
            for q, k, v, (_, m, _) in zip(qs, ks_, vs_, groups)]

  mono_fn = jax.jit(lambda q, k, v, c: fwd_bwd(mono, q, k, v, c)[:2])
  mono_args = [to_groups(x) for x in (seq_q, seq_k, seq_v, cot)]

  group_of, index_in = np.full(length, -1), np.zeros(length, int)  # where the device's rows are
  for g, (_, _, place) in enumerate(groups):
    at = place[rows[me]]
    group_of[at >= 0], index_in[at >= 0] = g, at[at >= 0]

  def from_groups(xs):  # the device's rows, in its order
    out = jnp.zeros((length, *xs[0].shape[2:]), xs[0].dtype)
    for g, x in enumerate(xs):
      sel = np.flatnonzero(group_of == g)
      out = out.at[sel].set(x.reshape(-1, *x.shape[2:])[index_in[sel]])
    return out[None]

  q_me = take(seq_q, rows[me])
  memory = ring_fn.lower(q_me, ks, vs).compile().memory_analysis()
  t_ring = median_call_seconds(ring_fn, q_me, ks, vs, repeats=FLAGS.repeats)
  t_mono = median_call_seconds(mono_fn, *mono_args, repeats=FLAGS.repeats)
  o_ring, dq_ring = ring_fn(q_me, ks, vs)[:2]
  o_mono, dq_mono = (from_groups(x) for x in mono_fn(*mono_args))
  against_xla = {}
  if FLAGS.compare_xla:
    o_x, dq_x = pass_of(dataclasses.replace(ring, kernels=None))(q_me, ks, vs)[:2]
    against_xla = {"out_rel_err_vs_xla_blocks": rel_err(o_ring, o_x),
                   "dq_rel_err_vs_xla_blocks": rel_err(dq_ring, dq_x), "xla_blocks_dq_rel_err": rel_err(dq_x, dq_mono)}
  pairs_device, pairs_all = float(np.sum(pos[rows[me]] + 1)), float(np.sum(pos + 1))
  flops = lambda pairs: 3.5 * 4 * pairs * h * d
  rate_ring, rate_mono = flops(pairs_device) / t_ring, flops(pairs_all) / t_mono
  return {"tokens_per_device": length, "blocks": n, "docs": spec, "documents": int(lens.size),
          "mean_doc": float(lens.mean()), "tile": FLAGS.tile,
          "packed_slots": documents.packed_slots((1, length, h, d)), "implementation": FLAGS.implementation,
          "ring_temp_gib": getattr(memory, "temp_size_in_bytes", 0) / 2**30, **against_xla,
          "ring_ms": 1e3 * t_ring, "reference_ms": 1e3 * t_mono, "ring_tflops": rate_ring / 1e12,
          "reference_tflops": rate_mono / 1e12, "ratio": rate_ring / rate_mono,
          "visible_share": pairs_device / (length * total / 2), "out_rel_err": rel_err(o_ring, o_mono),
          "dq_rel_err": rel_err(dq_ring, dq_mono)}


def main(argv):
  del argv
  documents.TILE, documents.MAX_DOCUMENTS = FLAGS.tile, FLAGS.max_documents
  print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
  results = []
  for n in map(int, FLAGS.blocks):
    for spec in FLAGS.docs:
      r = measure(FLAGS.length, n, spec)
      results.append(r)
      print(f"RESULT N={n} docs={spec} slots={r['packed_slots']} tile={r['tile']} {r['implementation']}: "
            f"ring {r['ring_ms']:.1f} ms (temp {r['ring_temp_gib']:.2f} GiB) "
            f"({r['ring_tflops']:.0f} TFLOP/s) reference {r['reference_ms']:.1f} ms ({r['reference_tflops']:.0f}) "
            f"ratio {r['ratio']:.3f} err {r['out_rel_err']:.1e} {r['dq_rel_err']:.1e} "
            f"{ {k: round(v, 5) for k, v in r.items() if 'xla_blocks' in k} }", flush=True)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": results}, f, indent=2)
  print(f"\n{'L':>6}{'N':>3}{'docs':>8}{'ndocs':>6}{'slots':>6}{'tile':>6}{'impl':>8}{'ring ms':>9}{'ref ms':>9}"
        f"{'ring TF':>8}{'ref TF':>8}{'ratio':>7}{'out err':>9}{'dq err':>9}")
  for r in results:
    print(f"{r['tokens_per_device']:>6}{r['blocks']:>3}{r['docs']:>8}{r['documents']:>6}{r['packed_slots']:>6}"
          f"{r['tile']:>6}{r['implementation'][:7]:>8}{r['ring_ms']:>9.2f}{r['reference_ms']:>9.2f}"
          f"{r['ring_tflops']:>8.0f}{r['reference_tflops']:>8.0f}{r['ratio']:>7.3f}{r['out_rel_err']:>9.1e}{r['dq_rel_err']:>9.1e}")


if __name__ == "__main__":
  app.run(main)
