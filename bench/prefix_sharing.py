"""Prefix sharing: throughput of requests that share a long prefix, with the paged cache's prefix
tree on and off (same engine, same pages, same requests), and the time to first token of a request
whose prefix is cached.

`--requests` requests of one `--prefix`-token prefix (a system prompt, a document asked several
questions) plus a `--suffix`-token question of their own, `--new` greedy tokens each (EOS off),
all queued at once into `--slots` slots. The prefix is sent alone first in both runs (one request
of 1 new token; with the tree on it leaves the prefix's blocks cached, as an earlier user would),
then a round of other questions compiles every shape; the measured round asks new questions.
Reports output tokens per second over the makespan, the mean TTFT, and whether the outputs agree.
Parameters are a random initialisation of `--config` (bf16 on GPUs). Prints a table last; writes JSON.

  python bench/prefix_sharing.py --config=1b --prefix=2048 --requests=32 --out=prefix_sharing.json
  python bench/prefix_sharing.py --config=tiny --prefix=96 --suffix=8 --new=8 --requests=8 --slots=4 \\
      --page_size=16 --out=/tmp/prefix.json                                   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="1b")
  ap.add_argument("--set", action="append", default=[])
  ap.add_argument("--prefix", type=int, default=2048)
  ap.add_argument("--suffix", type=int, default=64)
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--requests", type=int, default=32)
  ap.add_argument("--slots", type=int, default=32)
  ap.add_argument("--token_budget", type=int, default=2048)
  ap.add_argument("--page_size", type=int, default=64)
  ap.add_argument("--decode_steps", type=int, default=1, help="decode steps per engine step")
  ap.add_argument("--out", required=True)
  args = ap.parse_args()

  from parallel.xla_flags import apply_default_flags
  apply_default_flags(serving=True)  # as serve.py does, before JAX starts
  import jax

  import configs
  from serving.engine import Engine, Paging, Request, SamplingParams
  from serving.loading import load

  config = configs.get_config(args.config, args.set)
  if jax.default_backend() == "gpu" and not any(o.startswith("model.compute_dtype=") for o in args.set):
    config = configs.get_config(args.config, [*args.set, "model.compute_dtype=bfloat16"])
  loaded = load(config, devices=jax.devices()[:1])
  model = loaded.config.model
  need = args.prefix + args.suffix + args.new + args.decode_steps - 1  # a loop may run past a request's end
  max_len = -(-need // args.page_size) * args.page_size
  if max_len > model.max_seq_len:
    raise SystemExit(f"prefix + suffix + new = {need} exceeds model.max_seq_len={model.max_seq_len}")
  rng = np.random.default_rng(0)
  prefix = tuple(int(t) for t in rng.integers(1, model.vocab_size, args.prefix))
  questions = lambda: [prefix + tuple(int(t) for t in rng.integers(1, model.vocab_size, args.suffix))
                       for _ in range(args.requests)]
  warm_prompts, prompts = questions(), questions()
  pages = args.slots * max_len // args.page_size

  def run(prefix_caching: bool) -> dict:
    engine = Engine(model, loaded.params, plan=loaded.plan, slots=args.slots, token_budget=args.token_budget,
                    max_len=max_len, eos_id=None, paging=Paging(args.page_size, pages, prefix_caching),
                    decode_steps=args.decode_steps)

    def drive(requests):
      first, tokens = {}, {r.id: [] for r in requests}
      for r in requests:
        engine.add(r)
      t0 = time.perf_counter()
      while engine.has_work():
        for e in engine.step():
          if e.token_ids:
            first.setdefault(e.request_id, time.perf_counter() - t0)
          tokens[e.request_id] += e.token_ids
      return time.perf_counter() - t0, first, tokens

    greedy = lambda n: SamplingParams(max_tokens=n, temperature=0.0)
    # The prefix alone, then a round of other questions: compiles every shape the measured round
    # meets (its questions are new, of the same lengths), and with the tree on leaves the prefix cached.
    drive([Request("prefix", prefix, greedy(1))])
    drive([Request(f"w{i}", p, greedy(args.new)) for i, p in enumerate(warm_prompts)])
    engine.reset_counters()
    seconds, first, tokens = drive([Request(str(i), p, greedy(args.new)) for i, p in enumerate(prompts)])
    stats = engine.prefix_cache
    out_tokens = sum(len(t) for t in tokens.values())
    return {"prefix_caching": prefix_caching, "seconds": seconds, "output_tokens": out_tokens,
            "tokens_per_s": out_tokens / seconds, "ttft_s_mean": float(np.mean(list(first.values()))),
            "hit_rate": stats["matched_tokens"] / stats["queried_tokens"],
            "outputs": [tokens[str(i)] for i in range(len(prompts))]}

  off, on = run(False), run(True)
  same = sum(a == b for a, b in zip(off["outputs"], on["outputs"]))
  result = {"config": args.config, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "args": vars(args), "same_outputs": same,
            "rows": [{k: v for k, v in r.items() if k != "outputs"} for r in (off, on)]}
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"\nprefix sharing, {args.config} on {result['device']}: {args.requests} requests of a {args.prefix}-token "
        f"prefix + {args.suffix}, {args.new} new, {args.slots} slots, pages of {args.page_size}, "
        f"{args.decode_steps} decode steps per engine step, attention {model.decode_attention}")
  print(f"{'prefix cache':>12} {'tokens/s':>9} {'TTFT mean':>10} {'hit rate':>8} {'makespan':>9}")
  for r in (off, on):
    print(f"{'on' if r['prefix_caching'] else 'off':>12} {r['tokens_per_s']:>9.1f} {r['ttft_s_mean'] * 1e3:>8.1f}ms "
          f"{r['hit_rate']:>8.1%} {r['seconds']:>8.2f}s")
  print(f"speed-up {on['tokens_per_s'] / off['tokens_per_s']:.2f}x; same outputs {same}/{len(prompts)}")


if __name__ == "__main__":
  main()
