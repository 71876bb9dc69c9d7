"""The repo's AdamW (`training/optimizer.py`: global-norm clipping, then `optax.adamw` with bias
correction and masked decoupled weight decay) as pure functions, for the per-step algorithms over
`replica` (1-bit Adam, EControl) that replace the optimizer's update. Purely local: nothing is
communicated here; every array float32 like the parameters, on whatever sharding they come in.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

F32 = jnp.float32


def clip_by_global_norm(tree: Any, max_norm: float) -> Any:
  """optax.clip_by_global_norm's rule (max_norm <= 0: no clipping)."""
  if max_norm <= 0:
    return tree
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(F32))) for x in jax.tree.leaves(tree)))
  return jax.tree.map(lambda x: jnp.where(norm < max_norm, x, x / norm * max_norm).astype(x.dtype), tree)


def adamw_step(params: Any, m_hat: Any, v_hat: Any, mask: Any, *, lr: Any, eps: float,
               weight_decay: float) -> Any:
  """p - lr (m_hat / (sqrt(v_hat) + eps) + wd * mask * p), as optax.adamw (float32 math)."""
  def one(p, mh, vh, decay):
    u = mh / (jnp.sqrt(vh) + eps) + (weight_decay * p.astype(F32) if decay else 0.0)
    return (p.astype(F32) - lr * u).astype(p.dtype)
  return jax.tree.map(one, params, m_hat, v_hat, mask)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdamWRule:
  """AdamW's hyperparameters, shared by the per-step rules (a base dataclass: its fields are
  keyword-only). `decay_mask`: a pytree of bools like params (None: decay all), the repo's
  `matrix_mask`."""

  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip: float = 1.0
  decay_mask: Any = None

  @staticmethod
  def adamw_fields(optimizer_cfg: Any) -> dict:
    """These fields from the `optimizer` config section."""
    o = optimizer_cfg
    return dict(b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, grad_clip=o.grad_clip)

  def mask(self, params: Any) -> Any:
    return jax.tree.map(lambda _: True, params) if self.decay_mask is None else self.decay_mask

  def adamw(self, grads: Any, m: Any, v: Any, params: Any, *, t: jax.Array, lr: Any) -> tuple[Any, Any, Any]:
    """One full AdamW step from `grads` (clipped here) at 1-based step t (int32 scalar).
    Returns (new params, new m, new v)."""
    grads = clip_by_global_norm(grads, self.grad_clip)
    b1, b2, tf = self.b1, self.b2, t.astype(F32)
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
    v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
    new_params = adamw_step(params, jax.tree.map(lambda x: x / (1 - b1**tf), m),
                            jax.tree.map(lambda x: x / (1 - b2**tf), v), self.mask(params),
                            lr=lr, eps=self.eps, weight_decay=self.weight_decay)
    return new_params, m, v
