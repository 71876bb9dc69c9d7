"""Where a decode step's time goes: time the engine's decode loop alone and total its GPU kernels.

For each `--batches` B: B slots, each holding a `--prompt`-token prompt (one prefill), then decode
loops of `--steps` tokens per slot (one dispatch each, as the engine runs them), each reading the
first `--span` positions of a `--max_len` cache. Prints the wall time per decode step, the device
kernel time per step by kind and by kernel, the kernels launched per step and the idle time
between them, and the bytes a step reads (weights but the embedding table, plus the span of the
cache) over its wall time.

  PYTHONPATH=. python bench/serve_profile.py --config=1b --batches=1,32 --out=serve_profile.json
  XLA_FLAGS=--xla_gpu_enable_triton_gemm=true PYTHONPATH=. python bench/serve_profile.py ...  # a flag's effect
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import tempfile
import time

import numpy as np


def profile(loop, steps: int, top: int) -> dict:
  """One more dispatch of `loop` under the profiler: its GPU kernels, per decode step."""
  import jax

  from bench.profile_step import _kind, _load_events, device_kernel_times, largest_gaps

  trace_dir = tempfile.mkdtemp()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    jax.block_until_ready(loop())
  events, names = _load_events(trace_dir)
  kernels = device_kernel_times(events)
  per_step = lambda us: us / steps / 1e3  # ms
  by_kind: dict[str, float] = collections.defaultdict(float)
  for name, (t, _) in kernels.items():
    by_kind[_kind(name)] += t
  gaps = largest_gaps(events, names, 5)
  return {"kernel_ms_per_step": per_step(sum(t for t, _ in kernels.values())),
          "kernels_per_step": gaps["kernels"] / steps,
          "idle_ms_per_step_by_gap": {k: per_step(v) for k, v in gaps["idle_us_by_gap_size"].items()},
          "by_kind_ms": {k: per_step(v) for k, v in by_kind.items()},
          "kernels": [{"name": k, "ms_per_step": per_step(t), "calls_per_step": n / steps, "kind": _kind(k)}
                      for k, (t, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])],
          "largest_gaps": gaps["largest"]}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="1b")
  ap.add_argument("--set", action="append", default=[])
  ap.add_argument("--batches", default="1,32")
  ap.add_argument("--prompt", type=int, default=128)
  ap.add_argument("--steps", type=int, default=64, help="decode steps per dispatch")
  ap.add_argument("--repeats", type=int, default=3, help="timed dispatches per batch")
  ap.add_argument("--max_len", type=int, default=512, help="cache positions per slot")
  ap.add_argument("--span", type=int, default=0, help="cache positions every loop reads (0: all of --max_len; "
                  "the engine reads a power of two above its longest sequence); the bytes counted are the "
                  "weights and this span of the cache")
  ap.add_argument("--separate_projections", action="store_true",
                  help="serve q/k/v and gate/up as separate weights, as trained (default: fused, models.fused)")
  ap.add_argument("--top", type=int, default=20)
  ap.add_argument("--label", default="", help="a name for this run in the table (e.g. the XLA flags tried)")
  ap.add_argument("--hlo", default="", help="write the compiled decode loop of the first batch here (gzipped text)")
  ap.add_argument("--out", required=True)
  args = ap.parse_args()

  from parallel.xla_flags import apply_default_flags
  apply_default_flags(serving=True)
  import jax
  import jax.numpy as jnp

  import configs
  from serving.loading import load
  from serving.runner import ModelRunner

  config = configs.get_config(args.config, args.set)
  loaded = load(config, devices=jax.devices()[:1])
  m = loaded.config.model
  itemsize = jnp.dtype(m.compute_dtype).itemsize
  n_params = sum(x.size for x in jax.tree.leaves(loaded.params))
  weight_bytes = (n_params - (0 if m.tie_embeddings else m.vocab_size * m.d_model)) * itemsize
  max_len = args.max_len
  span = args.span or max_len
  if args.prompt + args.steps * (args.repeats + 2) > span or span > max_len:
    raise SystemExit(f"--prompt + --steps x (--repeats + 2) must fit in --span={span}, and --span in --max_len")
  greedy = (np.zeros(1, np.float32), np.zeros(1, np.int32), np.ones(1, np.float32), np.zeros(1, np.uint32),
            np.zeros(1, np.int32))
  rows = []
  for batch in [int(b) for b in args.batches.split(",")]:
    runner = ModelRunner(m, loaded.params, plan=loaded.plan, slots=batch, max_len=max_len,
                         fused_projections=not args.separate_projections)
    rng = np.random.default_rng(0)
    chunks = [(rng.integers(0, m.vocab_size, args.prompt), s, 0) for s in range(batch)]
    bucket = 1 << (args.prompt - 1).bit_length()
    token, _ = runner.prefill(chunks, bucket, tuple(np.repeat(a, batch) for a in greedy))
    tokens = np.asarray(token)[:batch]
    active = np.ones(batch, bool)
    sampling = tuple(np.repeat(a, batch) for a in greedy)

    def loop():
      return runner.decode(tokens, active, sampling, args.steps, span=span)[0]

    if args.hlo and not rows:
      with gzip.open(args.hlo, "wt") as f:
        f.write(runner.compiled_decode(tokens, active, sampling, args.steps, span=span).as_text())
    t0 = time.perf_counter()
    jax.block_until_ready(loop())  # compiles
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(loop())
      times.append(time.perf_counter() - t0)
    step_ms = 1e3 * min(times) / args.steps
    kv_bytes = 2 * m.n_layers * span * m.n_kv_heads * m.resolved_head_dim * itemsize * batch
    row = {"batch": batch, "label": args.label, "compile_s": compile_s, "wall_ms_per_step": step_ms,
           "bytes_per_step": weight_bytes + kv_bytes}
    if jax.default_backend() == "gpu":
      row.update(profile(loop, args.steps, args.top))
    rows.append(row)
    if "kernels" not in row:
      print(f"batch {batch}: wall {step_ms:.3f} ms per step (no GPU: no kernel profile)", flush=True)
      continue
    print(f"\nbatch {batch}: wall {step_ms:.3f} ms per step, kernels {row['kernel_ms_per_step']:.3f} ms, "
          f"{row['kernels_per_step']:.0f} kernels per step, idle by gap size (ms per step) "
          + ", ".join(f"{k} {v:.3f}" for k, v in row["idle_ms_per_step_by_gap"].items()), flush=True)
    for kind, t in sorted(row["by_kind_ms"].items(), key=lambda kv: -kv[1]):
      print(f"  {kind:<20} {t:8.3f} ms")
    for k in row["kernels"][:args.top]:
      print(f"  {k['ms_per_step']:8.4f} ms {k['calls_per_step']:6.1f}x  {k['kind']:<18} {k['name'][:100]}")
    del runner

  with open(args.out, "w") as f:
    json.dump({"config": args.config, "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
               "args": vars(args), "rows": rows}, f, indent=2)
  print(f"\nserve_profile {args.config} {args.label} on {jax.devices()[0].device_kind}")
  print(f"{'batch':>5} {'wall ms':>8} {'kernel ms':>9} {'kernels':>8} {'GB/s':>7}")
  for r in rows:
    print(f"{r['batch']:>5} {r['wall_ms_per_step']:>8.3f} {r.get('kernel_ms_per_step', 0):>9.3f} "
          f"{r.get('kernels_per_step', 0):>8.0f} "
          f"{r['bytes_per_step'] / r['wall_ms_per_step'] / 1e6:>7.0f}")


if __name__ == "__main__":
  main()
