"""AdamW with linear warmup + cosine decay, global-norm clipping, and no decay on norm scales."""

from __future__ import annotations

from typing import Any

import jax
import optax

from configs import OptimizerConfig


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      decay_steps=max(total_steps, cfg.warmup_steps + 1), end_value=cfg.learning_rate * cfg.min_lr_ratio)


def matrix_mask(axes_tree: Any) -> Any:
  """True for weight matrices (two or more non-`layers` axes): what weight decay applies to, and
  what mixed precision casts to the compute dtype (norm scales stay float32)."""
  return jax.tree.map(lambda axes: sum(a != "layers" for a in axes) >= 2, axes_tree,
                      is_leaf=lambda x: isinstance(x, tuple))


def make_optimizer(cfg: OptimizerConfig, total_steps: int, axes_tree: Any) -> optax.GradientTransformation:
  parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  parts.append(optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=matrix_mask(axes_tree)))
  return optax.chain(*parts)
