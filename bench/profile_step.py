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
flags.DEFINE_string("hlo", "", "Write the compiled (optimized) HLO of the step here, gzipped.")

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


def _load_events(trace_dir: str) -> tuple[list[dict], dict[int, str]]:
  """The trace's complete events on GPU tracks, and each GPU track's process name."""
  path = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True) + glob.glob(
      f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
  with gzip.open(path[0]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  pids = {e["pid"]: e["args"].get("name", "") for e in events
          if e.get("ph") == "M" and e.get("name") == "process_name"}
  gpu_pids = {pid: name for pid, name in pids.items() if "/device:GPU" in name or "GPU" in name}
  return [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e], gpu_pids


def device_kernel_times(events: list[dict]) -> dict[str, tuple[float, int]]:
  """Kernel name -> (total microseconds, count) over the GPU stream tracks of the trace."""
  totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
  for e in events:
    t = totals[e["name"]]
    t[0] += float(e["dur"])
    t[1] += 1
  return {k: (v[0], v[1]) for k, v in totals.items()}


def _union_us(intervals: list[tuple[float, float]]) -> float:
  total, end = 0.0, float("-inf")
  for start, stop in sorted(intervals):
    if stop > end:
      total += stop - max(start, end)
      end = stop
  return total


def _device(track_name: str) -> str:
  """A GPU's name from one of its tracks' names (a GPU may have a track per stream)."""
  m = re.search(r"GPU:?\s*(\d+)", track_name)
  return f"GPU {m.group(1)}" if m else track_name


def overlap_by_device(events: list[dict], names: dict[int, str]) -> dict[str, dict[str, float]]:
  """Per GPU, microseconds of: the profiled span, compute kernels running (any stream),
  collectives running, collectives running while no compute kernel does (exposed), and idle."""
  out = {}
  for device in sorted(set(map(_device, names.values()))):
    pids = {pid for pid, name in names.items() if _device(name) == device}
    mine = [e for e in events if e["pid"] in pids]
    if not mine:
      continue
    spans = [(float(e["ts"]), float(e["ts"]) + float(e["dur"]), _kind(e["name"]) == "collective") for e in mine]
    compute = _union_us([(a, b) for a, b, c in spans if not c])
    comm = _union_us([(a, b) for a, b, c in spans if c])
    busy = _union_us([(a, b) for a, b, _ in spans])
    span = max(b for _, b, _ in spans) - min(a for a, _, _ in spans)
    out[device] = {"span": span, "compute": compute, "collective": comm, "exposed_collective": busy - compute,
                 "idle": span - busy}
  return out


def largest_gaps(events: list[dict], names: dict[int, str], top: int) -> dict:
  """The longest stretches with no kernel running on the first GPU, with the kernels around them."""
  first = sorted(set(map(_device, names.values())))[0]
  pids = {pid for pid, name in names.items() if _device(name) == first}
  mine = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"]) for e in events if e["pid"] in pids)
  gaps, end, last = [], float("-inf"), ""
  for start, stop, name in mine:
    if start > end and last:
      gaps.append({"us": start - end, "after": last[:60], "before": name[:60]})
    if stop > end:
      end, last = stop, name
  buckets = {"<5us": 0.0, "5-50us": 0.0, ">=50us": 0.0}
  for g in gaps:
    buckets["<5us" if g["us"] < 5 else "5-50us" if g["us"] < 50 else ">=50us"] += g["us"]
  return {"kernels": len(mine), "idle_us_by_gap_size": buckets, "largest": sorted(gaps, key=lambda g: -g["us"])[:top]}


def main(argv):
  del argv
  config = configs.get_config(FLAGS.config, ["data.source=synthetic", "checkpoint.enabled=false", *FLAGS.set])
  from parallel.xla_flags import apply_default_flags
  apply_default_flags(device_loops=config.model.n_experts > 0)  # as train.py does
  import jax

  from data import make_dataset
  from training.loop import to_global_batch
  from training.state import init_state, setup_from_config
  from training.step import make_train_step

  setup = setup_from_config(config)
  data = make_dataset(config.data, vocab_size=config.model.vocab_size)
  state, step = init_state(setup), make_train_step(setup)
  for _ in range(3):
    state, metrics = step(state, to_global_batch(setup, next(data)))
  jax.block_until_ready(metrics)
  if FLAGS.hlo:
    with gzip.open(FLAGS.hlo, "wt") as f:
      f.write(step.lower(state, to_global_batch(setup, next(data))).compile().as_text())
  trace_dir = tempfile.mkdtemp()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(FLAGS.steps):
      state, metrics = step(state, to_global_batch(setup, next(data)))
    jax.block_until_ready(metrics)
  events, gpu_names = _load_events(trace_dir)
  kernels = device_kernel_times(events)
  per_step = lambda us: us / FLAGS.steps / 1e3 / len(set(map(_device, gpu_names.values())))
  total = sum(t for t, _ in kernels.values())
  by_kind: dict[str, float] = collections.defaultdict(float)
  for name, (t, _) in kernels.items():
    by_kind[_kind(name)] += t
  print(f"device kernel time per step and GPU: {per_step(total):.1f} ms")
  for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
    print(f"  {kind:<20} {per_step(t):8.1f} ms {100 * t / total:5.1f}%")
  rows = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:FLAGS.top]
  for name, (t, n) in rows:
    print(f"  {per_step(t):8.2f} ms {n // FLAGS.steps:5d}x  {_kind(name):<18} {name[:110]}")
  overlap = overlap_by_device(events, gpu_names)
  ms = lambda us: us / FLAGS.steps / 1e3
  print("per GPU, ms per step: span, compute busy, collectives busy, collectives exposed, idle")
  for name, o in overlap.items():
    print(f"  {name[-20:]:<20} " + " ".join(f"{ms(o[k]):8.1f}" for k in
                                            ("span", "compute", "collective", "exposed_collective", "idle")))
  gaps = largest_gaps(events, gpu_names, 8)
  print(f"first GPU: {gaps['kernels'] / FLAGS.steps:.0f} kernels per step; idle ms per step by gap size: "
        + ", ".join(f"{k} {ms(v):.2f}" for k, v in gaps["idle_us_by_gap_size"].items()))
  print("largest idle gaps on the first GPU (us): after -> before")
  for g in gaps["largest"]:
    print(f"  {g['us']:9.1f}  {g['after']} -> {g['before']}")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"per_step_ms": per_step(total), "by_kind_ms": {k: per_step(v) for k, v in by_kind.items()},
                 "gaps": gaps,
                 "overlap_ms": {n: {k: ms(v) for k, v in o.items()} for n, o in overlap.items()},
                 "kernels": [{"name": k, "ms_per_step": per_step(t), "calls_per_step": n / FLAGS.steps}
                             for k, (t, n) in rows]}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
