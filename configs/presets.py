"""Named presets. Each is a function returning a `Config`; nothing here but numbers."""

from __future__ import annotations

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


PRESETS = {"tiny": tiny, "small": small, "1b": one_b}
