"""Attention-work imbalance over data-parallel ranks, before and after `data.balance.balance_rows`.

For each global batch, the work of a rank is the sum over its rows of the squared document
lengths; imbalance is max / mean over ranks (1.0 is perfect), averaged over the batches. Two
inputs: the built-in corpus (packed standard-library files) and a long-tailed synthetic mix
(Pareto document lengths), both packed into windows as training packs them.

  PYTHONPATH=. python bench/balance_report.py --out=balance.json
"""

from __future__ import annotations

import json

import numpy as np
from absl import app, flags

from configs.base import DataConfig
from data import make_dataset
from data.balance import attention_work, balance_rows, imbalance
from data.packing import PackedSequences

FLAGS = flags.FLAGS
flags.DEFINE_integer("seq_len", 4096, "Window length.")
flags.DEFINE_integer("global_batch", 64, "Rows per global batch.")
flags.DEFINE_integer("ranks", 8, "Data-parallel ranks.")
flags.DEFINE_integer("steps", 50, "Batches measured (the built-in corpus stops at one epoch).")
flags.DEFINE_string("out", "", "Write the results as JSON here.")


def _measure(batches) -> dict:
  before, after = [], []
  for seg in batches:
    work = attention_work(seg)
    before.append(imbalance(work, FLAGS.ranks))
    after.append(imbalance(work, FLAGS.ranks, balance_rows(work, FLAGS.ranks)))
  return {"batches": len(before), "imbalance_before": float(np.mean(before)), "imbalance_after": float(np.mean(after)),
          "worst_before": float(np.max(before)), "worst_after": float(np.max(after))}


def builtin_batches():
  cfg = DataConfig(seq_len=FLAGS.seq_len, global_batch=FLAGS.global_batch, val_fraction=0.0)
  ds = make_dataset(cfg, vocab_size=257)
  steps = min(FLAGS.steps, ds.num_sequences // FLAGS.global_batch)
  return [ds.get_batch(s)["segment_ids"] for s in range(steps)]


def long_tail_batches():
  rng = np.random.default_rng(0)
  eos = 256
  lengths = np.minimum((rng.pareto(1.2, 200_000) + 1) * 64, 64 * FLAGS.seq_len).astype(int)
  total = FLAGS.steps * FLAGS.global_batch * FLAGS.seq_len + 1
  lengths = lengths[:np.searchsorted(np.cumsum(lengths + 1), total) + 1]
  stream = np.concatenate([np.append(rng.integers(0, 256, n), eos) for n in lengths])[:total]
  windows = PackedSequences(stream, FLAGS.seq_len, eos)
  order = rng.permutation(len(windows))  # as training shuffles windows
  b = FLAGS.global_batch
  return [np.stack([windows[i]["segment_ids"] for i in order[s * b:(s + 1) * b]]) for s in range(FLAGS.steps)]


def main(argv):
  del argv
  rows = {"builtin corpus": _measure(builtin_batches()), "long-tailed synthetic": _measure(long_tail_batches())}
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"seq_len": FLAGS.seq_len, "global_batch": FLAGS.global_batch, "ranks": FLAGS.ranks, **rows}, f,
                indent=2)
  print(f"\nattention-work imbalance (max/mean over {FLAGS.ranks} ranks), {FLAGS.global_batch} x {FLAGS.seq_len}")
  print(f"{'data':<24}{'batches':>8}{'before':>9}{'after':>9}{'worst before':>14}{'worst after':>13}")
  for name, r in rows.items():
    print(f"{name:<24}{r['batches']:>8}{r['imbalance_before']:>9.3f}{r['imbalance_after']:>9.3f}"
          f"{r['worst_before']:>14.3f}{r['worst_after']:>13.3f}")


if __name__ == "__main__":
  app.run(main)
