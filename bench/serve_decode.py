"""Decode speed of the serving engine on one GPU, against the memory roofline and against peers.

1. HBM bandwidth, measured here: the fastest of three large on-device passes (read + write).
2. Batch-1 decode (`--prompt` tokens in, `--new` out, greedy): time per output token, and the
   bytes a decode step must read (the weights it multiplies with, i.e. all but the embedding
   table of which it reads one row; plus the KV cache of the context so far, averaged over the
   output) divided by that time, as a fraction of the measured bandwidth.
3. Same call as the peer (`bench/serve_peer.py`: transformers `generate`, static cache,
   torch.compile; run first, in a subprocess, so the two never share the GPU's memory): `--batches`
   requests of `--prompt` + `--new` tokens at once (a token budget that takes every prompt in the
   first step); output tokens per second, prompt included.
4. Continuous batching against static batching of the same requests at each `--concurrency` C
   (slots = C): `--requests_per_slot` x C requests of `--prompt` tokens, output lengths drawn from
   an exponential distribution of mean `--mean_out` clipped to [`--min_out`, `--max_out`] (a heavy
   tail, as chat traces have). Continuous: all queued at once, a request joins as soon as a slot
   frees; static: groups of C, the next group starts when the whole group is done. Output tokens
   per second, and TPOT (per request: (finish - first token) / (tokens - 1); mean and p99).

Parameters are a random initialisation of `--config` (bf16 in the engine); EOS is off, so every
request produces exactly its length.

  python bench/serve_decode.py --config=1b --out=serve_decode.json
  python bench/serve_decode.py --config=tiny --prompt=16 --new=16 --batches=1,4 --concurrency=4 \
      --mean_out=8 --max_out=32 --hbm_gib=0.01 --out=/tmp/smoke.json     # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_peer(args) -> dict | None:
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    path = f.name
  cmd = [sys.executable, os.path.join(REPO, "bench", "serve_peer.py"), f"--config={args.config}",
         f"--batches={args.batches}", f"--prompt={args.prompt}", f"--new={args.new}", f"--out={path}",
         *[f"--set={s}" for s in args.set]]
  done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
  if done.returncode:
    print(f"peer failed (exit {done.returncode}); continuing without it", flush=True)
    return None
  with open(path) as f:
    return json.load(f)


def hbm_bandwidth(gib: float) -> dict:
  """Bytes per second (read + written) of three passes over `gib` GiB, each of which reads every
  byte once and writes every byte once: x + 1 on bf16, x + 1 on float32, and a plain copy (a jit
  output may not alias its undonated input, so XLA emits a device-to-device copy). Kernels for
  narrow types may not reach the peak, so the fraction of HBM is taken against the fastest."""
  import jax
  import jax.numpy as jnp

  from bench.timing import median_call_seconds

  n = int(gib * 2**30)
  out = {}
  for name, dtype, fn in (("add_bf16", jnp.bfloat16, lambda a: a + 1), ("add_f32", jnp.float32, lambda a: a + 1),
                          ("copy", jnp.float32, lambda a: jnp.copy(a))):
    x = jnp.ones((n // jnp.dtype(dtype).itemsize,), dtype)
    out[name] = 2 * x.nbytes / median_call_seconds(jax.jit(fn), x, repeats=20)
    del x
  return out


def drive(engine, requests, groups: int | None = None) -> dict:
  """Runs `requests` to the end (all queued at once, or `groups` at a time with the next group
  queued only when the engine is idle). Returns timings per request and the makespan."""
  first, finish, count = {}, {}, {}
  pending = list(requests)
  t0 = time.perf_counter()
  while pending or engine.has_work():
    if pending and (groups is None or not engine.has_work()):
      take = len(pending) if groups is None else groups
      for r in pending[:take]:
        engine.add(r)
      pending = pending[take:]
    for e in engine.step():
      now = time.perf_counter()
      if e.token_ids:
        first.setdefault(e.request_id, now)
        count[e.request_id] = count.get(e.request_id, 0) + len(e.token_ids)
      if e.finished:
        finish[e.request_id] = now
  makespan = time.perf_counter() - t0
  tpot = [(finish[r] - first[r]) / (count[r] - 1) for r in finish if count[r] > 1]
  ttft = [first[r] - t0 for r in first]
  out_tokens = sum(count.values())
  return {"requests": len(requests), "output_tokens": out_tokens, "seconds": makespan,
          "tokens_per_s": out_tokens / makespan, "tpot_ms_mean": 1e3 * statistics.mean(tpot),
          "tpot_ms_p99": 1e3 * float(np.percentile(tpot, 99)), "ttft_s_mean": statistics.mean(ttft)}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="1b")
  ap.add_argument("--set", action="append", default=[], help="config overrides, as train.py's --set")
  ap.add_argument("--prompt", type=int, default=128, help="prompt tokens of every request")
  ap.add_argument("--new", type=int, default=256, help="output tokens in the batch-1 and peer comparisons")
  ap.add_argument("--batches", default="1,32", help="batch sizes compared with the peer")
  ap.add_argument("--concurrency", default="32,128", help="slot counts for continuous vs static batching")
  ap.add_argument("--requests_per_slot", type=int, default=3, help="requests per slot: the more, the "
                  "less the longest request's tail weighs on both makespans")
  ap.add_argument("--mean_out", type=float, default=128.0)
  ap.add_argument("--min_out", type=int, default=8)
  ap.add_argument("--max_out", type=int, default=1024)
  ap.add_argument("--token_budget", type=int, default=2048, help="tokens per engine step (decode + prompt "
                  "chunks): room for the prompts of the requests that finish during a decode loop")
  ap.add_argument("--decode_steps", type=int, default=8, help="decode steps per dispatch when batching")
  ap.add_argument("--decode_steps_single", type=int, default=64, help="decode steps per dispatch at batch 1 and "
                  "in the peer comparison")
  ap.add_argument("--hbm_gib", type=float, default=8.0, help="GiB copied to measure the bandwidth")
  ap.add_argument("--no_peer", action="store_true")
  ap.add_argument("--batches_only", action="store_true", help="skip continuous vs static batching")
  ap.add_argument("--batching_only", action="store_true", help="only continuous vs static batching (no peer, "
                  "no batch-1 or peer-shaped runs)")
  ap.add_argument("--out", required=True, help="JSON results path")
  args = ap.parse_args()

  peer = None if args.no_peer or args.batching_only else run_peer(args)  # before JAX takes the GPU's memory

  from parallel.xla_flags import apply_default_flags
  apply_default_flags(serving=True)
  import jax
  import jax.numpy as jnp

  import configs
  from serving.engine import Engine, Request, SamplingParams
  from serving.loading import load

  config = configs.get_config(args.config, args.set)
  loaded = load(config, devices=jax.devices()[:1])
  m = loaded.config.model
  max_len = args.prompt + max(args.new, args.max_out)
  if max_len > m.max_seq_len:
    raise SystemExit(f"--prompt + max(--new, --max_out) = {max_len} exceeds model.max_seq_len={m.max_seq_len}")
  rng = np.random.default_rng(0)

  def engine(slots, decode_steps, token_budget):
    return Engine(m, loaded.params, plan=loaded.plan, slots=slots, token_budget=max(token_budget, slots),
                  max_len=max_len, eos_id=None, decode_steps=decode_steps)

  def requests(n, lengths, tag):
    return [Request(f"{tag}{i}", tuple(rng.integers(0, m.vocab_size, args.prompt).tolist()),
                    SamplingParams(max_tokens=int(k), temperature=0.0)) for i, k in enumerate(lengths)]

  report = {"config": args.config, "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
            "prompt": args.prompt, "new": args.new, "max_len": max_len, "args": vars(args)}
  probes = hbm_bandwidth(args.hbm_gib)
  bandwidth = max(probes.values())
  report["hbm_bytes_per_s"], report["hbm_probes_bytes_per_s"] = bandwidth, probes

  # Batch 1 and the peer's batch sizes: same lengths for every request.
  itemsize = jnp.dtype(m.compute_dtype).itemsize
  n_params = sum(x.size for x in jax.tree.leaves(loaded.params))
  embed_lookup_only = 0 if m.tie_embeddings else m.vocab_size * m.d_model
  weight_bytes = (n_params - embed_lookup_only) * itemsize
  mean_context = args.prompt + (args.new - 1) / 2
  kv_bytes = 2 * m.n_layers * mean_context * m.n_kv_heads * m.resolved_head_dim * itemsize
  report["same_lengths"] = []
  for batch in ([] if args.batching_only else [int(b) for b in args.batches.split(",")]):
    # Every prompt in the first step, as `generate` does it.
    eng = engine(batch, args.decode_steps_single, batch * args.prompt)
    t0 = time.perf_counter()
    drive(eng, requests(batch, [args.new] * batch, "warm"))  # compiles
    warm_s = time.perf_counter() - t0
    runs = [drive(eng, requests(batch, [args.new] * batch, f"b{batch}r{i}")) for i in range(3)]
    row = min(runs, key=lambda r: r["seconds"])
    row["batch"], row["warmup_s"] = batch, warm_s
    if batch == 1:
      row["bytes_per_token"] = weight_bytes + kv_bytes
      row["fraction_of_hbm"] = (weight_bytes + kv_bytes) / (row["tpot_ms_mean"] / 1e3) / bandwidth
    if peer:
      match = [p for p in peer["results"] if p["batch"] == batch]
      if match:
        row["peer_tokens_per_s"] = match[0]["tokens_per_s"]
        row["vs_peer"] = row["tokens_per_s"] / match[0]["tokens_per_s"]
    report["same_lengths"].append(row)
    print(f"batch {batch}: {row['tokens_per_s']:.0f} tok/s, TPOT {row['tpot_ms_mean']:.3f} ms", flush=True)
    del eng

  # Continuous against static batching of the same requests.
  report["batching"] = []
  for c in ([] if args.batches_only else [int(x) for x in args.concurrency.split(",")]):
    n = args.requests_per_slot * c
    lengths = np.clip(np.round(rng.exponential(args.mean_out, n)), args.min_out, args.max_out).astype(int)
    eng = engine(c, args.decode_steps, args.token_budget)
    t0 = time.perf_counter()
    # Each run once untimed: the schedule depends on the lengths only (EOS is off), so the timed
    # runs meet exactly the shapes (prefill rows and chunk buckets, cache spans) compiled here.
    drive(eng, requests(n, lengths, f"wc{c}-"))
    drive(eng, requests(n, lengths, f"ws{c}-"), groups=c)
    warm_s = time.perf_counter() - t0
    cont = drive(eng, requests(n, lengths, f"c{c}-"))
    stat = drive(eng, requests(n, lengths, f"s{c}-"), groups=c)
    report["batching"].append({"concurrency": c, "continuous": cont, "static": stat, "warmup_s": warm_s,
                               "speedup": cont["tokens_per_s"] / stat["tokens_per_s"]})
    print(f"concurrency {c}: continuous {cont['tokens_per_s']:.0f} tok/s, static {stat['tokens_per_s']:.0f}",
          flush=True)
    del eng
  report["peer"] = peer

  with open(args.out, "w") as f:
    json.dump(report, f, indent=2)
  measured = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in probes.items())
  print(f"\nserve_decode {args.config} on {report['device_kind']}: HBM {bandwidth / 1e9:.0f} GB/s measured "
        f"(the fastest of: {measured} GB/s)")
  print(f"{'case':<28} {'tok/s':>10} {'TPOT ms':>9} {'p99 ms':>8} {'vs peer':>8} {'%HBM':>6}")
  for row in report["same_lengths"]:
    vs = f"{row['vs_peer']:.2f}x" if "vs_peer" in row else "-"
    hbm = f"{100 * row['fraction_of_hbm']:.0f}" if "fraction_of_hbm" in row else "-"
    print(f"{'batch ' + str(row['batch']):<28} {row['tokens_per_s']:>10.0f} {row['tpot_ms_mean']:>9.3f} "
          f"{row['tpot_ms_p99']:>8.3f} {vs:>8} {hbm:>6}")
    if "peer_tokens_per_s" in row:
      print(f"{'  peer batch ' + str(row['batch']):<28} {row['peer_tokens_per_s']:>10.0f}")
  for row in report["batching"]:
    for kind in ("continuous", "static"):
      r = row[kind]
      print(f"{kind + ' C=' + str(row['concurrency']):<28} {r['tokens_per_s']:>10.0f} {r['tpot_ms_mean']:>9.3f} "
            f"{r['tpot_ms_p99']:>8.3f}")
    print(f"{'  continuous / static':<28} {row['speedup']:>9.2f}x")


if __name__ == "__main__":
  main()
