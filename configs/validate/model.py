"""The model's shape, dtypes, remat policy, attention kernel and mixture-of-experts fields."""

from __future__ import annotations

from configs.base import ATTENTION_IMPLS, DECODE_ATTENTIONS, DTYPES, REMAT_POLICIES, ROUTER_SCORES, ModelConfig
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
  require_choice(m.decode_attention, DECODE_ATTENTIONS, "model.decode_attention")
  k = m.decode_split_k
  require(k == 0 or (k >= 1 and all(n % k == 0 for n in (m.d_model, m.n_heads * m.resolved_head_dim, m.d_ff))),
          f"model.decode_split_k={k}: must be 0 (auto), or >= 1 and divide model.d_model={m.d_model}, the "
          f"attention width {m.n_heads * m.resolved_head_dim} and model.d_ff={m.d_ff} (the contractions it cuts)")
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
  _check_experts(m)


def _check_experts(m: ModelConfig) -> None:
  """The mixture-of-experts fields (models/moe.py); n_experts=0 (dense) leaves the rest unread."""
  require(m.n_experts >= 0, f"model.n_experts={m.n_experts}: must be >= 0 (0: every MLP dense)")
  if m.n_experts == 0:
    require(m.n_shared_experts == 0, f"model.n_shared_experts={m.n_shared_experts} needs routed experts: "
                                     f"set model.n_experts > 0")
    return
  require(1 <= m.experts_top_k <= m.n_experts,
          f"model.experts_top_k={m.experts_top_k}: must be between 1 and model.n_experts={m.n_experts}")
  require(m.expert_d_ff >= 0, f"model.expert_d_ff={m.expert_d_ff}: must be positive, or 0 for model.d_ff")
  require(m.n_shared_experts >= 0, f"model.n_shared_experts={m.n_shared_experts}: must be >= 0")
  require(m.shared_expert_d_ff >= 0,
          f"model.shared_expert_d_ff={m.shared_expert_d_ff}: must be positive, or 0 for the routed experts' width")
  require(m.shared_expert_d_ff == 0 or m.n_shared_experts > 0,
          f"model.shared_expert_d_ff={m.shared_expert_d_ff} is set but model.n_shared_experts=0 (no shared experts)")
  require(not m.shared_expert_gate or m.n_shared_experts > 0,
          "model.shared_expert_gate=true needs shared experts: set model.n_shared_experts > 0")
  require(m.moe_every >= 1, f"model.moe_every={m.moe_every}: must be >= 1 (1: every layer after the dense ones)")
  require(0 <= m.moe_first_dense < m.n_layers,
          f"model.moe_first_dense={m.moe_first_dense}: must be between 0 and model.n_layers-1={m.n_layers - 1} "
          f"(some layer must be sparse; model.n_experts=0 makes every layer dense)")
  require(any(i >= m.moe_first_dense and (i + 1) % m.moe_every == 0 for i in range(m.n_layers)),
          f"model.moe_first_dense={m.moe_first_dense}, model.moe_every={m.moe_every}: no layer of "
          f"model.n_layers={m.n_layers} is sparse (layer i is when i >= moe_first_dense and (i+1) % moe_every == 0)")
  require_choice(m.router_score, ROUTER_SCORES, "model.router_score")
  require(m.routed_scale > 0, f"model.routed_scale={m.routed_scale}: must be positive")
  require(m.router_groups >= 1 and m.n_experts % m.router_groups == 0,
          f"model.router_groups={m.router_groups}: must divide model.n_experts={m.n_experts} (experts form equal groups)")
  require(1 <= m.router_topk_groups <= m.router_groups,
          f"model.router_topk_groups={m.router_topk_groups}: must be between 1 and model.router_groups={m.router_groups}")
  usable = m.router_topk_groups * (m.n_experts // max(m.router_groups, 1))
  require(m.experts_top_k <= usable,
          f"model.experts_top_k={m.experts_top_k} exceeds the {usable} experts of the model.router_topk_groups="
          f"{m.router_topk_groups} groups a token may pick (model.router_groups={m.router_groups})")
  for name in ("aux_loss_weight", "seq_aux_loss_weight", "z_loss_weight"):
    require(getattr(m, name) >= 0, f"model.{name}={getattr(m, name)}: must be >= 0")
  require(m.bias_update_rate >= 0, f"model.bias_update_rate={m.bias_update_rate}: must be >= 0 (0: no "
                                   f"auxiliary-loss-free balancing)")
