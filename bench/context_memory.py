"""Per-device memory of one long sequence's train step under each context-parallel method, from
XLA's compiled memory analysis (nothing is run), at mesh.seq = 1, 2, 4, 8 on emulated CPU devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
    PYTHONPATH=. python bench/context_memory.py --seq_len=8192 --out=context_memory.json

`temp` is XLA's temporary buffers (the activations kept for the backward and the working set);
`args` the parameters, optimizer state and batch a device holds. At seq = 1 every method is the
dense model; the table is printed last, with each size's temp against seq = 1's.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from absl import app, flags

import configs

FLAGS = flags.FLAGS
flags.DEFINE_integer("seq_len", 8192, "Tokens in the one sequence of the batch.")
flags.DEFINE_list("methods", ["allgather", "ring", "tokenring", "ulysses", "usp"], "sharding.attention values.")
flags.DEFINE_list("sizes", ["1", "2", "4", "8"], "mesh.seq sizes.")
flags.DEFINE_list("set", ["model.d_model=512", "model.n_layers=2", "model.n_heads=8", "model.n_kv_heads=8",
                          "model.d_ff=1024", "model.vocab_size=512", "model.remat=full"], "Model overrides.")
flags.DEFINE_string("out", "", "Write the results as JSON here.")


def analyse(method: str, n: int) -> dict:
  from training.state import setup_from_config
  from training.step import make_train_step
  overrides = [*FLAGS.set, f"model.max_seq_len={FLAGS.seq_len}", f"data.seq_len={FLAGS.seq_len}",
               "data.global_batch=1", "mesh.data=1", f"mesh.seq={n}",
               f"sharding.attention={method if n > 1 else 'dense'}", "data.source=synthetic"]
  if method == "usp" and n > 1:
    overrides.append(f"sharding.ulysses_degree={2 if n > 2 else 1}")
  config = configs.get_config("tiny", overrides)
  setup = setup_from_config(config, jax.devices()[:n])
  batch = {k: jax.ShapeDtypeStruct((1, FLAGS.seq_len), np.int32, sharding=setup.batch_sharding)
           for k in ("inputs", "targets", "segment_ids", "positions")}
  batch["loss_mask"] = jax.ShapeDtypeStruct((1, FLAGS.seq_len), np.float32, sharding=setup.batch_sharding)
  stats = make_train_step(setup).lower(setup.abstract_state, batch).compile().memory_analysis()
  return {"method": method, "seq": n, "temp_bytes": int(stats.temp_size_in_bytes),
          "argument_bytes": int(stats.argument_size_in_bytes)}


def main(argv):
  del argv
  rows = []
  for method in FLAGS.methods:
    for n in map(int, FLAGS.sizes):
      rows.append(analyse(method, n))
      print(f"RESULT {method:<10} seq={n} temp {rows[-1]['temp_bytes'] / 2**20:9.1f} MiB", flush=True)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"seq_len": FLAGS.seq_len, "model": FLAGS.set, "rows": rows}, f, indent=2)
  sizes = list(map(int, FLAGS.sizes))
  print(f"\nper-device temporary MiB (x of seq=1), {FLAGS.seq_len} tokens")
  print(f"{'method':<11}" + "".join(f"{'seq=' + str(n):>18}" for n in sizes))
  for method in FLAGS.methods:
    mine = {r["seq"]: r["temp_bytes"] for r in rows if r["method"] == method}
    cells = [f"{mine[n] / 2**20:9.1f} ({mine[n] / mine[sizes[0]]:.2f})" for n in sizes]
    print(f"{method:<11}" + "".join(f"{c:>18}" for c in cells))


if __name__ == "__main__":
  app.run(main)
