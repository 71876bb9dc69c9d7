"""Training throughput of the `moe` preset (or any preset with experts) on one GPU: tokens/s, MFU on
active parameters (`models.transformer.flops_per_token`: top-k routed + shared experts + router),
peak memory, with the learned router and with forced balance (`model.router_force_balance`: every
expert gets the same tokens), so routing skew and kernel speed are told apart.

  PYTHONPATH=. python bench/moe_train_speed.py --config=moe --out=moe.json
  PYTHONPATH=. python bench/moe_train_speed.py --config=moe --variants=forced --set sharding.grouped_matmul=xla

Each variant runs the `train.py` step (bench/train_speed.py's `measure`) on synthetic tokens; the
table comes last, one row per variant, and the JSON holds every number.
"""

from __future__ import annotations

import gc
import json

from absl import app, flags

import configs
from bench.train_speed import measure

FLAGS = flags.FLAGS  # --config, --set, --warmup, --steps, --windows, --out: bench/train_speed.py's flags
flags.DEFINE_list("variants", ["learned", "forced"], "learned: the router picks; forced: round-robin experts.")
FLAGS.set_default("config", "moe")

VARIANTS = {"learned": [], "forced": ["model.router_force_balance=true"]}


def main(argv):
  del argv
  from parallel.xla_flags import apply_default_flags
  apply_default_flags(device_loops=True)  # as train.py does for experts
  results = []
  for name in FLAGS.variants:
    if name not in VARIANTS:
      raise app.UsageError(f"--variants: {name!r} is not one of {sorted(VARIANTS)}")
    overrides = ["data.source=synthetic", "checkpoint.enabled=false", *FLAGS.set, *VARIANTS[name]]
    config = configs.get_config(FLAGS.config, overrides)
    if config.model.n_experts == 0:
      raise app.UsageError(f"--config={FLAGS.config} has no experts (model.n_experts=0)")
    results.append({"label": name, "overrides": overrides, **measure(config, FLAGS.warmup, FLAGS.steps, FLAGS.windows)})
    gc.collect()  # the previous variant's state is unreachable now; free it before the next one
    if FLAGS.out:
      with open(FLAGS.out, "w") as f:
        json.dump(results, f, indent=2)
  print(f"{'variant':<10} {'ms/step':>9} {'tok/s':>9} {'MFU(active)':>12} {'peak GiB':>9} {'imbalance':>10} "
        f"{'dropped':>8}")
  for r in results:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
    print(f"{r['label']:<10} {r['step_s'] * 1e3:9.1f} {r['tokens_per_s']:9.0f} {mfu:>12} {r['peak_mem_gib']:9.1f} "
          f"{r.get('load_imbalance', float('nan')):10.2f} {100 * r.get('dropped_fraction', 0.0):7.1f}%", flush=True)


if __name__ == "__main__":
  app.run(main)
