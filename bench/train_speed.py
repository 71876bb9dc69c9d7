"""Training throughput of shardlab's own train step (the `train.py` code path) on synthetic tokens.

  PYTHONPATH=. python bench/train_speed.py --config=1b --set model.attention_impl=cudnn --out=r.json

Prints one table row and writes JSON: step time, tokens/s, MFU against the dense bf16 peak, and
peak device memory. Each step is queued before the host waits for the previous one, as `train.py`
runs them (bench/timing.py); the step time is the median window's mean.
"""

from __future__ import annotations

import json
import time

from absl import app, flags

import configs
from bench.timing import steady_step_times, summarize

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "1b", "Preset to benchmark.")
flags.DEFINE_multi_string("set", [], "Config overrides, section.field=value (repeatable).")
flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
flags.DEFINE_integer("steps", 10, "Steps per timed window.")
flags.DEFINE_integer("windows", 3, "Timed windows.")
flags.DEFINE_string("label", "", "Name of this variant in the table.")
flags.DEFINE_string("out", "", "Write the result as JSON here.")


def measure(config: configs.Config, warmup: int, steps: int, windows: int) -> dict:
  import jax

  from data import make_dataset
  from models.transformer import flops_per_token
  from training.loop import to_global_batch
  from training.metrics import peak_flops_per_device
  from training.state import init_state, setup_from_config
  from training.step import make_train_step

  setup = setup_from_config(config)
  data = make_dataset(config.data, vocab_size=config.model.vocab_size, process_index=jax.process_index(),
                      process_count=jax.process_count())
  state, step = init_state(setup), make_train_step(setup)
  t0 = time.perf_counter()
  state, metrics = step(state, to_global_batch(setup, next(data)))
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    state, metrics = step(state, to_global_batch(setup, next(data)))

  def dispatch():
    nonlocal state
    state, out = step(state, to_global_batch(setup, next(data)))
    return out

  times, metrics = steady_step_times(dispatch, jax.block_until_ready, steps, windows)
  jax.block_until_ready(metrics)
  timing = summarize(times)
  step_s = timing["step_s"]
  tokens = config.data.global_batch * config.data.seq_len
  fpt = flops_per_token(config.model, setup.n_params, config.data.seq_len)
  peak = peak_flops_per_device()
  n_dev = jax.device_count()
  mem = [d.memory_stats() or {} for d in jax.local_devices()]
  return {
      "config": config.name, "devices": n_dev, "device_kind": jax.devices()[0].device_kind,
      "jax": jax.__version__, "params": setup.n_params, "tokens_per_step": tokens,
      "compile_s": compile_s, **timing,
      "tokens_per_s": tokens / step_s, "tokens_per_s_per_device": tokens / step_s / n_dev,
      "flops_per_token": fpt, "mfu": (tokens / step_s * fpt / (peak * n_dev)) if peak else None,
      "peak_mem_gib": max(m.get("peak_bytes_in_use", 0) for m in mem) / 2**30,
      "loss": float(metrics["loss"]),
      # Models with experts: the last step's routing (train.py logs the same names).
      **{k: float(metrics[k]) for k in ("load_imbalance", "load_imbalance_max", "dropped_fraction") if k in metrics},
  }


def main(argv):
  del argv
  from parallel.xla_flags import apply_default_flags
  apply_default_flags()  # as train.py does
  config = configs.get_config(FLAGS.config, ["data.source=synthetic", "checkpoint.enabled=false", *FLAGS.set])
  result = {"label": FLAGS.label or " ".join(FLAGS.set), "overrides": FLAGS.set,
            **measure(config, FLAGS.warmup, FLAGS.steps, FLAGS.windows)}
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(result, f, indent=2)
  mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] else "n/a"
  print(f"RESULT {result['label']:<40} {result['step_s'] * 1e3:8.1f} ms/step {result['tokens_per_s']:9.0f} tok/s "
        f"MFU {mfu:>6} peak {result['peak_mem_gib']:.1f} GiB", flush=True)


if __name__ == "__main__":
  app.run(main)
