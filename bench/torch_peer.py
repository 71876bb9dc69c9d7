"""The peer: Hugging Face `LlamaForCausalLM` of the same shape, trained in PyTorch on the same GPU.

bf16 autocast over float32 parameters, fused AdamW, SDPA attention, `torch.compile`.

  python bench/torch_peer.py --config=1b --out=peer.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import transformers

import configs
from bench.timing import steady_step_times, summarize
from models.transformer import flops_per_token


def make_torch_step(model, opt, tokens, *, compile: bool, device: str, autocast: bool):
  """One training step of a transformers causal LM on `tokens` [B, L + 1] (next-token loss, bf16
  autocast if asked, clipping at 1.0, the optimizer's step); returns the loss."""
  fwd = torch.compile(model) if compile else model

  def step():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
      loss = fwd(input_ids=tokens[:, :-1], labels=tokens[:, 1:]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  return step


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--config", default="1b")
  ap.add_argument("--batch", type=int, default=0, help="sequences per step (default: the preset's)")
  ap.add_argument("--steps", type=int, default=10, help="steps per timed window")
  ap.add_argument("--windows", type=int, default=3)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--no-compile", action="store_true")
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  cfg = configs.get_config(args.config)
  m, seq = cfg.model, cfg.data.seq_len
  batch = args.batch or cfg.data.global_batch
  hf = transformers.LlamaConfig(
      vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff, num_hidden_layers=m.n_layers,
      num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, head_dim=m.resolved_head_dim,
      max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
      rope_theta=m.rope_theta)
  hf._attn_implementation = "sdpa"
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(hf).cuda().train()
  n_params = sum(p.numel() for p in model.parameters())
  opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
  tokens = torch.randint(0, m.vocab_size, (batch, seq + 1), device="cuda")
  step = make_torch_step(model, opt, tokens, compile=not args.no_compile, device="cuda", autocast=True)

  t0 = time.perf_counter()
  step()
  torch.cuda.synchronize()
  compile_s = time.perf_counter() - t0
  for _ in range(args.warmup):
    step()
  torch.cuda.synchronize()
  torch.cuda.reset_peak_memory_stats()

  def dispatch():
    loss = step()
    done = torch.cuda.Event()
    done.record()
    return loss, done

  # The same steady-state timing as bench/train_speed.py: step i+1 queued before waiting for step i.
  times, (loss, _) = steady_step_times(dispatch, lambda h: h[1].synchronize(), args.steps, args.windows)
  torch.cuda.synchronize()
  timing = summarize(times)
  step_s = timing["step_s"]
  n_tok = batch * seq
  fpt = flops_per_token(m, n_params, seq)
  result = {"label": "pytorch transformers peer", "config": args.config, "torch": torch.__version__,
            "transformers": transformers.__version__, "device_kind": torch.cuda.get_device_name(),
            "params": n_params, "tokens_per_step": n_tok, "compile_s": compile_s, **timing,
            "tokens_per_s": n_tok / step_s, "flops_per_token": fpt, "mfu": n_tok / step_s * fpt / 989e12,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": float(loss.detach())}
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  print(f"RESULT {result['label']:<40} {step_s * 1e3:8.1f} ms/step {result['tokens_per_s']:9.0f} tok/s "
        f"MFU {100 * result['mfu']:5.1f}% peak {result['peak_mem_gib']:.1f} GiB", flush=True)


if __name__ == "__main__":
  main()
