"""Speculative decoding at batch 1: tokens per second with a draft model against plain decoding, on
held-out text of the run's corpus.

Prompts are `--prompts` windows of `--prompt_len` tokens from the validation split of the config's
data (the built-in corpus by default: documents the models were not trained on), each continued by
`--new` greedy tokens (EOS off), one request at a time through an engine of one slot: the plain
engine runs `--decode_steps` steps per engine step, the speculative one `--rounds` rounds (so the
host dispatches and waits once per call, not per token or round). For the plain engine and for each `--tokens` k: decode
tokens per second (per request: (new - 1) / (last token - first token), so prefill is left out; the
median over prompts), the draft's acceptance rate, tokens per round, and whether the greedy text
equals plain decoding's (it should, up to rounding of near-ties in bf16). One untimed request first
compiles each engine. With `--profile` k on a GPU it also profiles one call of `--rounds` rounds at
that k (with each of the two loops, `serving/speculative.py`) and one of `--decode_steps` plain steps
(`bench/serve_profile.profile`): kernel time by kind, kernels launched and idle time, per round and
per plain step. Prints a table last; writes JSON.

  python bench/speculative.py --config=tiny --checkpoint=runs/tiny --draft_checkpoint=runs/draft \\
      --draft_set model.n_layers=1 --tokens=2,4 --out=speculative.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import numpy as np


def held_out_prompts(config, tokenizer, n: int, length: int) -> list[tuple[int, ...]]:
  """`n` windows of `length` tokens from the validation documents of the built-in corpus."""
  from data.corpus import builtin_corpus
  from data.pipeline import split_documents

  docs = split_documents(builtin_corpus(config.data.max_corpus_bytes), config.data.val_fraction, "validation")
  prompts = []
  for doc in docs:
    ids = tokenizer.encode(doc)
    for start in range(0, len(ids) - length, 4 * length):
      prompts.append(tuple(int(t) for t in ids[start:start + length]))
      if len(prompts) == n:
        return prompts
  raise SystemExit(f"the validation split holds only {len(prompts)} windows of {length} tokens")


def decode(engine, prompts, new: int) -> tuple[list[list[int]], list[float]]:
  """Each prompt alone: its greedy tokens and its decode tokens per second."""
  from serving.engine import Request, SamplingParams

  outputs, rates = [], []
  for i, prompt in enumerate(prompts):
    engine.add(Request(f"r{i}", prompt, SamplingParams(max_tokens=new, temperature=0.0)))
    tokens, first = [], None
    while engine.has_work():
      for e in engine.step():
        if e.token_ids and first is None:
          first = time.perf_counter()
        tokens += e.token_ids
    rates.append((len(tokens) - 1) / (time.perf_counter() - first))
    outputs.append(tokens)
  return outputs, rates


def profile_calls(engine, prompt, args) -> dict:
  """Kernels of one call of `--rounds` speculative rounds (with each loop: the static trip count, and
  the early-stop loop whose predicate the host reads every round) and of one of `--decode_steps`
  plain steps, per round and per step, on the slot a request of `prompt` left (greedy; every round
  runs)."""
  import jax

  from bench.serve_profile import profile

  decode(engine, [prompt], args.new)  # the slot now holds a prompt and its output
  spec = engine._replicas[0].speculative
  rows = (np.zeros(1), np.zeros(1), np.ones(1), np.zeros(1), np.zeros(1))
  token, active = np.zeros(1, np.int32), np.ones(1, bool)
  round_call = lambda stop_early: spec.rounds(token, active, rows, args.rounds, stop_early=stop_early)[0]
  calls = {"round": (lambda: round_call(False), args.rounds),
           "round, early-stop loop": (lambda: round_call(True), args.rounds),
           "plain step": (lambda: spec.target.decode(token, active, rows, args.decode_steps)[0], args.decode_steps)}
  out = {}
  for name, (call, n) in calls.items():
    jax.block_until_ready(call())  # compiles
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    out[name] = {"wall_ms": 1e3 * (time.perf_counter() - t0) / n, **profile(call, n, 0)}
    p = out[name]
    print(f"per {name} (k = {args.profile}): wall {p['wall_ms']:.3f} ms, kernels {p['kernel_ms_per_step']:.3f} ms, "
          f"{p['kernels_per_step']:.0f} kernels, idle " + ", ".join(f"{g} {v:.3f}" for g, v in
                                                                   p["idle_ms_per_step_by_gap"].items()), flush=True)
    for kind, t in sorted(p["by_kind_ms"].items(), key=lambda kv: -kv[1]):
      print(f"  {kind:<20} {t:8.3f} ms", flush=True)
    for kernel in p["kernels"][:12]:
      print(f"  {kernel['ms_per_step']:8.4f} ms {kernel['calls_per_step']:6.1f}x  {kernel['name'][:90]}", flush=True)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="tiny")
  ap.add_argument("--set", action="append", default=[])
  ap.add_argument("--checkpoint", default=None)
  ap.add_argument("--hf", default=None)
  ap.add_argument("--draft_config", default=None, help="default: --config")
  ap.add_argument("--draft_set", action="append", default=[])
  ap.add_argument("--draft_checkpoint", default=None)
  ap.add_argument("--draft_hf", default=None)
  ap.add_argument("--tokens", default="2,4", help="draft tokens per round to try")
  ap.add_argument("--decode_steps", type=int, default=32, help="plain decoding: steps per engine step")
  ap.add_argument("--rounds", type=int, default=8, help="speculative decoding: rounds per engine step")
  ap.add_argument("--prompts", type=int, default=8)
  ap.add_argument("--prompt_len", type=int, default=64)
  ap.add_argument("--new", type=int, default=48)
  ap.add_argument("--profile", type=int, default=0, help="on a GPU, profile a call of rounds at this k (0: none)")
  ap.add_argument("--out", required=True)
  args = ap.parse_args()

  from parallel.xla_flags import apply_default_flags
  apply_default_flags(serving=True)  # as serve.py does, before JAX starts
  import jax

  import configs
  from serving.engine import Draft, Engine
  from serving.loading import load

  config = configs.get_config(args.config, args.set)
  loaded = load(config, checkpoint=args.checkpoint, hf=args.hf, devices=jax.devices()[:1])
  draft_config = configs.get_config(args.draft_config or args.config, args.draft_set)
  draft_config = dataclasses.replace(draft_config, mesh=loaded.config.mesh, sharding=loaded.config.sharding,
                                     data=loaded.config.data)
  drafted = load(draft_config, checkpoint=args.draft_checkpoint, hf=args.draft_hf, devices=jax.devices()[:1])
  prompts = held_out_prompts(loaded.config, loaded.tokenizer, args.prompts, args.prompt_len)
  # Room for what a call may run past a request's end: steps, or rounds of k + 1 tokens.
  k_max = max(int(k) for k in args.tokens.split(","))
  max_len = args.prompt_len + args.new + max(args.decode_steps, args.rounds * (k_max + 1))

  def engine(k: int | None):
    draft = None if k is None else Draft(drafted.config.model, drafted.params, k)
    return Engine(loaded.config.model, loaded.params, plan=loaded.plan, slots=1, token_budget=args.prompt_len,
                  max_len=min(max_len, loaded.config.model.max_seq_len), eos_id=None, draft=draft,
                  decode_steps=args.decode_steps if k is None else args.rounds)

  rows, plain_tokens = [], None
  for k in [None] + [int(k) for k in args.tokens.split(",")]:
    e = engine(k)
    decode(e, prompts[:1], args.new)  # compiles
    e.reset_counters()
    outputs, rates = decode(e, prompts, args.new)
    row = {"draft_tokens": k or 0, "tokens_per_s": statistics.median(rates), "rates": rates}
    if k is None:
      plain_tokens = outputs
    else:
      s = e.speculation
      row |= {"acceptance": s["accepted"] / s["proposed"], "tokens_per_round": 1 + s["accepted"] / s["rounds"],
              "same_text": sum(a == b for a, b in zip(outputs, plain_tokens))}
    rows.append(row)
    print(json.dumps({key: v for key, v in row.items() if key != "rates"}), flush=True)

  profiles = {}
  if args.profile and jax.default_backend() == "gpu":
    profiles = profile_calls(engine(args.profile), prompts[0], args)
  base = rows[0]["tokens_per_s"]
  result = {"config": args.config, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "target": args.checkpoint or args.hf, "draft": args.draft_checkpoint or args.draft_hf,
            "draft_layers": drafted.config.model.n_layers, "target_layers": loaded.config.model.n_layers,
            "prompts": len(prompts), "prompt_len": args.prompt_len, "new": args.new, "decode_steps": args.decode_steps,
            "rounds": args.rounds, "rows": rows, "profiles": profiles}
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"\nspeculative decoding, batch 1, {args.config} on {result['device']} ({len(prompts)} held-out prompts "
        f"of {args.prompt_len} tokens, {args.new} new; {args.decode_steps} plain steps or {args.rounds} rounds per call)")
  print(f"{'draft tokens':>12} {'tokens/s':>9} {'speed-up':>8} {'acceptance':>10} {'tokens/round':>12} {'same text':>9}")
  for r in rows:
    spec = r["draft_tokens"] > 0
    acceptance = f"{r['acceptance']:.1%}" if spec else "-"
    per_round = f"{r['tokens_per_round']:.2f}" if spec else "-"
    same = f"{r['same_text']}/{len(prompts)}" if spec else "-"
    name = str(r["draft_tokens"]) if spec else "plain"
    print(f"{name:>12} {r['tokens_per_s']:>9.1f} {r['tokens_per_s'] / base:>7.2f}x {acceptance:>10} {per_round:>12} "
          f"{same:>9}")

if __name__ == "__main__":
  main()
