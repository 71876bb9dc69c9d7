"""The MoE peer: Hugging Face `Qwen2MoeForCausalLM` of the shardlab preset's shape, trained in PyTorch
on the same GPU: routed experts plus a shared expert (Qwen2-MoE's is one MLP of width n_shared x
shared width, with a sigmoid gate), the experts implementation `grouped_mm` (transformers 5.x),
fused AdamW, SDPA attention, `torch.compile`, its router aux loss at the preset's weight.

  python bench/moe_torch_peer.py --config=moe --weights=bf16 --out=peer_bf16.json
  python bench/moe_torch_peer.py --config=moe --weights=fp32 --out=peer_fp32.json

--weights=bf16: parameters and AdamW states in bfloat16. --weights=fp32: float32 master parameters
under bf16 autocast. --router=forced gives every expert the same tokens as shardlab's
`model.router_force_balance` does (token t's k-th pick is expert (t * K + k) mod E, weighted by the
router's probability of it), so forced-balance rows compare kernels with kernels. MFU counts active
parameters as shardlab does (`models.transformer.flops_per_token`).
--device=cpu --no-compile runs a tiny preset as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import transformers

import configs
from bench.timing import steady_step_times, summarize
from bench.torch_peer import make_torch_step
from models.moe import shared_width
from models.transformer import flops_per_token


def hf_config(m: configs.ModelConfig, experts: str) -> transformers.Qwen2MoeConfig:
  # Qwen2-MoE's sparse-layer rule is shardlab's (models/moe.py): mlp_only_layers, decoder_sparse_step.
  return transformers.Qwen2MoeConfig(
      vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff, num_hidden_layers=m.n_layers,
      num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, max_position_embeddings=m.max_seq_len,
      rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings, rope_parameters={"rope_type": "default",
      "rope_theta": m.rope_theta}, decoder_sparse_step=m.moe_every, mlp_only_layers=list(range(m.moe_first_dense)), moe_intermediate_size=m.expert_d_ff or m.d_ff,
      shared_expert_intermediate_size=shared_width(m), num_experts=m.n_experts, num_experts_per_tok=m.experts_top_k,
      norm_topk_prob=m.router_topk_norm, output_router_logits=m.aux_loss_weight > 0,
      router_aux_loss_coef=m.aux_loss_weight, experts_implementation=experts, attn_implementation="sdpa")


def force_balance(model: torch.nn.Module) -> list[torch.nn.Module]:
  """Replaces every Qwen2-MoE router's top-k picks with shardlab's round robin
  (`models.moe._round_robin`); the router still runs, and its logits still feed the aux loss.
  Returns the routers patched."""
  router_type = transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeTopKRouter
  routers = [mod for mod in model.modules() if isinstance(mod, router_type)]
  for router in routers:
    def forward(hidden_states, router=router, original=router.forward):
      logits, _, _ = original(hidden_states)
      t, k = logits.shape[0], router.top_k
      picks = (torch.arange(t, device=logits.device)[:, None] * k + torch.arange(k, device=logits.device)) % router.num_experts
      weights = torch.softmax(logits, dtype=torch.float, dim=-1).gather(1, picks)
      if router.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
      return logits, weights.to(logits.dtype), picks
    router.forward = forward
  return routers


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--config", default="moe")
  ap.add_argument("--batch", type=int, default=0, help="sequences per step (default: the preset's)")
  ap.add_argument("--seq", type=int, default=0, help="tokens per sequence (default: the preset's)")
  ap.add_argument("--weights", choices=("bf16", "fp32"), default="bf16")
  ap.add_argument("--experts", default="grouped_mm", help="transformers experts implementation")
  ap.add_argument("--router", choices=("learned", "forced"), default="learned",
                  help="forced: every expert gets the same tokens (round robin, as shardlab's forced balance)")
  ap.add_argument("--steps", type=int, default=10, help="steps per timed window")
  ap.add_argument("--windows", type=int, default=3)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--device", default="cuda")
  ap.add_argument("--no-compile", action="store_true")
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  cfg = configs.get_config(args.config)
  m = cfg.model
  seq, batch = args.seq or cfg.data.seq_len, args.batch or cfg.data.global_batch
  cuda = args.device == "cuda"
  torch.manual_seed(0)
  model = transformers.Qwen2MoeForCausalLM(hf_config(m, args.experts)).to(args.device).train()
  if args.weights == "bf16":
    model = model.to(torch.bfloat16)
  if args.router == "forced" and not force_balance(model):
    raise SystemExit("--router=forced: the model has no Qwen2-MoE routers")
  n_params = sum(p.numel() for p in model.parameters())
  opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)
  tokens = torch.randint(0, m.vocab_size, (batch, seq + 1), device=args.device)
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  # The loss includes the router's aux loss when its weight is on.
  step = make_torch_step(model, opt, tokens, compile=not args.no_compile, device=args.device,
                         autocast=args.weights == "fp32")

  t0 = time.perf_counter()
  step()
  sync()
  compile_s = time.perf_counter() - t0
  for _ in range(args.warmup):
    step()
  sync()
  if cuda:
    torch.cuda.reset_peak_memory_stats()

  def dispatch():
    loss = step()
    done = torch.cuda.Event() if cuda else None
    if done is not None:
      done.record()
    return loss, done

  # The same steady-state timing as bench/train_speed.py: step i+1 queued before waiting for step i.
  times, (loss, _) = steady_step_times(dispatch, lambda h: h[1].synchronize() if h[1] is not None else None,
                                       args.steps, args.windows)
  sync()
  timing = summarize(times)
  step_s = timing["step_s"]
  n_tok = batch * seq
  fpt = flops_per_token(m, n_params, seq)
  result = {"label": f"transformers Qwen2-MoE {args.weights} weights, {args.experts}, {args.router} router",
            "router": args.router, "config": args.config,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "device_kind": torch.cuda.get_device_name() if cuda else args.device, "params": n_params,
            "experts_implementation": model.config._experts_implementation, "tokens_per_step": n_tok,
            "compile_s": compile_s, **timing, "tokens_per_s": n_tok / step_s, "flops_per_token": fpt,
            "mfu": n_tok / step_s * fpt / 989e12 if cuda else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "loss": float(loss.detach())}
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  mfu = f"{100 * result['mfu']:5.1f}%" if result["mfu"] else "n/a"
  peak = f"{result['peak_mem_gib']:.1f} GiB" if result["peak_mem_gib"] is not None else "n/a"
  print(f"RESULT {result['label']:<48} {step_s * 1e3:8.1f} ms/step {result['tokens_per_s']:9.0f} tok/s "
        f"MFU(active) {mfu} peak {peak}", flush=True)


if __name__ == "__main__":
  main()
