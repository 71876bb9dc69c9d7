"""The model's shape, dtypes, remat policy and attention kernel."""

from __future__ import annotations

from configs.base import ATTENTION_IMPLS, DTYPES, REMAT_POLICIES, ModelConfig
from configs.validate.require import require, require_choice


def check(m: ModelConfig, backend: str) -> None:
  for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
    require(getattr(m, name) > 0, f"model.{name}={getattr(m, name)}: must be positive")
  require(m.head_dim >= 0, f"model.head_dim={m.head_dim}: must be positive, or 0 for d_model // n_heads")
  require(m.head_dim > 0 or m.d_model % m.n_heads == 0,
          f"model.d_model={m.d_model}, model.n_heads={m.n_heads}: d_model must be divisible by "
          f"n_heads when model.head_dim=0")
  require(m.n_heads % m.n_kv_heads == 0,
          f"model.n_heads={m.n_heads}, model.n_kv_heads={m.n_kv_heads}: n_heads must be a multiple "
          f"of n_kv_heads (grouped-query attention)")
  require(m.resolved_head_dim % 2 == 0, f"model.head_dim={m.resolved_head_dim}: RoPE needs an even head_dim")
  require_choice(m.remat, REMAT_POLICIES, "model.remat")
  require_choice(m.attention_impl, ATTENTION_IMPLS, "model.attention_impl")
  for name in ("param_dtype", "compute_dtype"):
    require_choice(getattr(m, name), DTYPES, f"model.{name}")
  if m.attention_impl == "cudnn":
    require(m.compute_dtype == "bfloat16",
            f"model.attention_impl='cudnn' needs model.compute_dtype='bfloat16' (got {m.compute_dtype!r}): "
            f"cuDNN flash attention has no float32 kernels")
    require(backend == "gpu", f"model.attention_impl='cudnn' needs an NVIDIA GPU, but this run's devices are "
                              f"{backend!r}; use 'auto' or 'xla'")
  require(1 <= m.scan_unroll <= m.n_layers and m.n_layers % m.scan_unroll == 0,
          f"model.scan_unroll={m.scan_unroll}: must divide model.n_layers={m.n_layers}")
  require(m.rope_theta > 0, f"model.rope_theta={m.rope_theta}: must be positive")
  require(m.rope_scaling_factor >= 1.0, f"model.rope_scaling_factor={m.rope_scaling_factor}: must be >= 1")
  require(m.norm_eps > 0, f"model.norm_eps={m.norm_eps}: must be positive")
  require(len(m.layer_pattern) > 0 and set(m.layer_pattern) <= {"S", "L"},
          f"model.layer_pattern={m.layer_pattern!r}: use the letters S (softmax) and L (linear attention)")
  require(m.n_layers % max(len(m.layer_pattern), 1) == 0,
          f"model.layer_pattern={m.layer_pattern!r} ({len(m.layer_pattern)} layers) does not repeat evenly over "
          f"model.n_layers={m.n_layers}")
  require(m.linear_chunk > 0, f"model.linear_chunk={m.linear_chunk}: must be positive")
  require(m.init_std > 0, f"model.init_std={m.init_std}: must be positive")
