"""Named presets. Each is a function returning a `Config`; nothing here but numbers."""

from __future__ import annotations

import dataclasses

from configs.base import CheckpointConfig, Config, DataConfig, ModelConfig, OptimizerConfig, TrainConfig


def tiny() -> Config:
  """A few seconds per step on a 2-core CPU; the default for tests and the README run."""
  return Config(
      name="tiny",
      model=ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=8, n_kv_heads=4,
                        d_ff=384, max_seq_len=128),
      data=DataConfig(seq_len=128, global_batch=16),
      optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=10),
      train=TrainConfig(steps=150, log_every=10, eval_every=50),
      checkpoint=CheckpointConfig(every=50),
  )


def small() -> Config:
  """About 125M parameters (GPT-2 small shape with Llama blocks)."""
  return Config(
      name="small",
      model=ModelConfig(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                        d_ff=2048, max_seq_len=2048, compute_dtype="bfloat16"),
      data=DataConfig(seq_len=2048, global_batch=32),
      optimizer=OptimizerConfig(learning_rate=6e-4, warmup_steps=200),
      train=TrainConfig(steps=5000, log_every=20, eval_every=500),
      checkpoint=CheckpointConfig(every=500),
  )


def one_b() -> Config:
  """d_model 2048, 16 layers, 16 heads, 8 KV heads, d_ff 5632, vocab 32000, seq 4096."""
  return Config(
      name="1b",
      model=ModelConfig(vocab_size=32000, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=8,
                        d_ff=5632, max_seq_len=4096, rope_theta=500000.0, compute_dtype="bfloat16",
                        # Fastest on one H100 at 16K tokens per step (BENCHMARKS.md): no remat
                        # fits (30 GiB), and unrolled layers let XLA fuse across them.
                        remat="none", scan_unroll=16),
      data=DataConfig(seq_len=4096, global_batch=4),
      optimizer=OptimizerConfig(learning_rate=3e-4, warmup_steps=500),
      train=TrainConfig(steps=10000, log_every=10, eval_every=1000),
      checkpoint=CheckpointConfig(every=1000),
  )


def tiny_moe() -> Config:
  """`tiny` with mixture-of-experts MLPs: one dense layer, then three of 8 routed experts (top-2)
  and one shared expert, Switch aux loss and auxiliary-loss-free bias balancing. Seconds per step
  on a 2-core CPU."""
  base = tiny()
  return dataclasses.replace(base, name="tiny_moe", model=dataclasses.replace(
      base.model, n_layers=4, n_experts=8, experts_top_k=2, expert_d_ff=128, n_shared_experts=1,
      moe_first_dense=1, aux_loss_weight=0.01, z_loss_weight=1e-3, bias_update_rate=1e-3))


def moe() -> Config:
  """About 2.8B parameters, 1.0B active per token: d_model 2048, 16 layers (16 heads, 8 KV heads),
  each with 16 routed experts of width 1408 (top-4) and 2 shared experts of width 1408, vocab
  32000, seq 4096, bf16 compute. Fits one H200 with AdamW (float32 masters and moments)."""
  return Config(
      name="moe",
      model=ModelConfig(vocab_size=32000, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=8, d_ff=5632,
                        max_seq_len=4096, rope_theta=500000.0, compute_dtype="bfloat16", remat="none",
                        scan_unroll=16, n_experts=16, experts_top_k=4, expert_d_ff=1408, n_shared_experts=2,
                        shared_expert_d_ff=1408, aux_loss_weight=0.01, z_loss_weight=1e-3),
      data=DataConfig(seq_len=4096, global_batch=4),
      optimizer=OptimizerConfig(learning_rate=3e-4, warmup_steps=500),
      train=TrainConfig(steps=10000, log_every=10, eval_every=1000),
      checkpoint=CheckpointConfig(every=1000),
  )


PRESETS = {"tiny": tiny, "small": small, "1b": one_b, "tiny_moe": tiny_moe, "moe": moe}
