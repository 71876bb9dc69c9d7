"""Where a train step's time goes: profile a few steps and total the device kernels by kind and name.

  PYTHONPATH=. python bench/profile_step.py --config=1b --set model.attention_impl=cudnn --out=prof.json

Uses `jax.profiler` with a Perfetto trace (JSON), so it needs no TensorBoard plugin to read.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile

from absl import app, flags

import configs

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "1b", "Preset to profile.")
flags.DEFINE_multi_string("set", [], "Config overrides, section.field=value (repeatable).")
flags.DEFINE_integer("steps", 3, "Profiled steps.")
flags.DEFINE_integer("top", 25, "Kernels to list.")
flags.DEFINE_string("out", "", "Write the per-kernel table as JSON here.")

_KINDS = [  # first match wins
    ("attention", re.compile(r"cudnn|fmha|flash|sdpa|attention", re.I)),
    ("gemm", re.compile(r"gemm|cublas|cutlass|sm90_xmma|nvjet|matmul|dot", re.I)),
    ("collective", re.compile(r"nccl|all-reduce|all-gather|reduce-scatter", re.I)),
    ("copy/transpose", re.compile(r"copy|transpose|memcpy|memset", re.I)),
    ("fusion/elementwise", re.compile(r"fusion|loop_|input_|reduce|convert|add|multiply", re.I)),
]


def _kind(name: str) -> str:
  for kind, pattern in _KINDS:
    if pattern.search(name):
      return kind
  return "other"


def device_kernel_times(trace_dir: str) -> dict[str, tuple[float, int]]:
  """Kernel name -> (total microseconds, count) over the GPU stream tracks of the trace."""
  path = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True) + glob.glob(
      f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
  with gzip.open(path[0]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  pids = {e["pid"]: e["args"].get("name", "") for e in events
          if e.get("ph") == "M" and e.get("name") == "process_name"}
  gpu_pids = {pid for pid, name in pids.items() if "/device:GPU" in name or "GPU" in name}
  totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e:
      t = totals[e["name"]]
      t[0] += float(e["dur"])
      t[1] += 1
  return {k: (v[0], v[1]) for k, v in totals.items()}


def main(argv):
  del argv
  from parallel.xla_flags import apply_default_flags
  apply_default_flags()  # as train.py does
  import jax

  from data import make_dataset
  from training.loop import to_global_batch, setup_for
  from training.state import init_state
  from training.step import make_train_step

  config = configs.get_config(FLAGS.config, ["data.source=synthetic", "checkpoint.enabled=false", *FLAGS.set])
  setup = setup_for(config)
  data = make_dataset(config.data, vocab_size=config.model.vocab_size)
  state, step = init_state(setup), make_train_step(setup)
  for _ in range(3):
    state, metrics = step(state, to_global_batch(setup, next(data)))
  jax.block_until_ready(metrics)
  trace_dir = tempfile.mkdtemp()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(FLAGS.steps):
      state, metrics = step(state, to_global_batch(setup, next(data)))
    jax.block_until_ready(metrics)
  kernels = device_kernel_times(trace_dir)
  per_step = lambda us: us / FLAGS.steps / 1e3
  total = sum(t for t, _ in kernels.values())
  by_kind: dict[str, float] = collections.defaultdict(float)
  for name, (t, _) in kernels.items():
    by_kind[_kind(name)] += t
  print(f"device kernel time per step: {per_step(total):.1f} ms")
  for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
    print(f"  {kind:<20} {per_step(t):8.1f} ms {100 * t / total:5.1f}%")
  rows = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:FLAGS.top]
  for name, (t, n) in rows:
    print(f"  {per_step(t):8.2f} ms {n // FLAGS.steps:5d}x  {_kind(name):<18} {name[:110]}")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"per_step_ms": per_step(total), "by_kind_ms": {k: per_step(v) for k, v in by_kind.items()},
                 "kernels": [{"name": k, "ms_per_step": per_step(t), "calls_per_step": n / FLAGS.steps}
                             for k, (t, n) in rows]}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
