"""The decode peer: Hugging Face `transformers` `generate` on the same Llama shape, same GPU.

bf16 weights, SDPA attention, greedy, a static KV cache (`cache_implementation="static"`), which
`generate` compiles with `torch.compile` itself; every request runs to `--new` tokens (EOS off).
Reports output tokens per second per batch size (prompt + generation, as one `generate` call).

  python bench/serve_peer.py --config=1b --batches=1,32 --prompt=128 --new=256 --out=peer.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import transformers

import configs


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--config", default="1b")
  ap.add_argument("--set", action="append", default=[], help="config overrides, as train.py's --set")
  ap.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
  ap.add_argument("--prompt", type=int, default=128)
  ap.add_argument("--new", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=3, help="timed calls per batch size (after two warm-up calls)")
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  m = configs.get_config(args.config, args.set).model
  device = "cuda" if torch.cuda.is_available() else "cpu"
  hf = transformers.LlamaConfig(
      vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff, num_hidden_layers=m.n_layers,
      num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, head_dim=m.resolved_head_dim,
      max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
      rope_theta=m.rope_theta, attn_implementation="sdpa")
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(hf).to(device=device, dtype=torch.bfloat16).eval()
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  results = []
  for batch in (int(b) for b in args.batches.split(",")):
    ids = torch.randint(0, m.vocab_size, (batch, args.prompt), device=device)

    def call():
      with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                             min_new_tokens=args.new, do_sample=False, cache_implementation="static")
      if device == "cuda":
        torch.cuda.synchronize()
      return out

    t0 = time.perf_counter()
    out = call()
    first_s = time.perf_counter() - t0
    assert out.shape == (batch, args.prompt + args.new), out.shape
    call()
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      call()
      times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    results.append({"batch": batch, "seconds": seconds, "first_call_s": first_s,
                    "tokens_per_s": batch * args.new / seconds, "ms_per_step": 1e3 * seconds / args.new})
    print(f"peer batch {batch}: {results[-1]['tokens_per_s']:.0f} tok/s ({results[-1]['ms_per_step']:.2f} ms/step)",
          flush=True)
  report = {"label": "transformers generate, static cache, torch.compile", "config": args.config,
            "prompt": args.prompt, "new": args.new, "torch": torch.__version__,
            "transformers": transformers.__version__,
            "device_kind": torch.cuda.get_device_name() if device == "cuda" else "cpu", "results": results}
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  main()
