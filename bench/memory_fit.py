"""Largest per-device batch and sequence length that fit, per remat policy, from XLA's own numbers.

  PYTHONPATH=. python bench/memory_fit.py --config=1b --policies=none,dots_and_attention --out=fit.json

Compiles the real train step (nothing runs) and reads `compiled.memory_analysis()`: arguments +
outputs - aliased (donated) + temporaries must stay under the device's memory limit. Batch is
doubled at the preset's sequence length; sequence length is doubled at batch 1.
"""

from __future__ import annotations

import json

from absl import app, flags

import configs
from bench.fit import largest

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "1b", "Preset to size.")
flags.DEFINE_list("policies", ["none", "dots_and_attention", "dots_no_batch", "full"], "Remat policies.")
flags.DEFINE_multi_string("set", [], "Extra overrides, section.field=value.")
flags.DEFINE_integer("max_batch", 64, "Largest per-device batch to try.")
flags.DEFINE_integer("max_seq", 131072, "Largest sequence length to try.")
flags.DEFINE_string("out", "", "Write the table as JSON here.")


def main(argv):
  del argv
  from parallel.xla_flags import apply_default_flags
  apply_default_flags()  # as train.py does
  import jax

  limit = jax.local_devices()[0].memory_stats()["bytes_limit"]
  base = ["data.source=synthetic", "checkpoint.enabled=false", *FLAGS.set]
  preset = configs.get_config(FLAGS.config, base)
  seq0 = preset.data.seq_len
  rows = []
  for policy in FLAGS.policies:
    over = [*base, f"model.remat={policy}"]
    by_batch = lambda b: configs.get_config(FLAGS.config, [*over, f"data.global_batch={b}"])
    by_seq = lambda s: configs.get_config(FLAGS.config, [*over, "data.global_batch=1", f"data.seq_len={s}",
                                                         f"model.max_seq_len={s}"])
    batches = [2 ** i for i in range(FLAGS.max_batch.bit_length()) if 2 ** i <= FLAGS.max_batch]
    seqs = [seq0 * 2 ** i for i in range(8) if seq0 * 2 ** i <= FLAGS.max_seq]
    best_b, tried_b = largest(by_batch, batches, limit)
    best_s, tried_s = largest(by_seq, seqs, limit)
    rows.append({"policy": policy, "max_batch_at_seq": best_b, "seq": seq0, "max_seq_at_batch1": best_s,
                 "tried_batch": tried_b, "tried_seq": tried_s})
    print(f"FIT {policy:<20} batch<= {best_b} (seq {seq0})   seq<= {best_s} (batch 1)", flush=True)
  result = {"device_kind": jax.devices()[0].device_kind, "bytes_limit_gib": limit / 2**30, "rows": rows}
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)
