"""Small building blocks of the Llama decoder: parameters with logical axes, RMSNorm, RoPE, SwiGLU."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from configs import ModelConfig
from parallel.plan import LogicalAxes, ShardingPlan


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: LogicalAxes, cfg: ModelConfig,
          init: str = "normal") -> nnx.Param:
  """A parameter carrying its logical axis names (metadata `logical_axes`), read by the rule tables."""
  dtype = jnp.dtype(cfg.param_dtype)
  if init == "ones":
    value = jnp.ones(shape, dtype)
  else:
    value = cfg.init_std * jax.random.normal(rngs.params(), shape, dtype)
  return nnx.Param(value, logical_axes=axes)


def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """einsum of compute-dtype operands summed in float32. XLA:CPU has no bf16 x bf16 -> f32 kernel
  for a batched matrix-vector product (a decode step's), so on CPUs the operands are upcast first:
  the same sums (bf16 values multiply exactly in float32); GPUs read the operands in their dtype."""
  f32 = jnp.float32
  return jax.lax.platform_dependent(
      a, b, cpu=lambda a, b: jnp.einsum(spec, a.astype(f32), b.astype(f32), precision="highest"),
      default=lambda a, b: jnp.einsum(spec, a, b, preferred_element_type=f32))


def split_k_product(x: jax.Array, w: jax.Array, n_contract: int, splits: int, out_dtype: Any = None) -> jax.Array:
  """x's last `n_contract` axes contracted with w's first ones, the contraction cut into `splits`
  parts that multiply as one batched product (float32 partial sums, added in float32, returned in
  `out_dtype`, by default x's). A decode step multiplies one or two rows by each weight; cuBLAS
  tiles such a product over its output columns only, so a 2048-wide output runs on a quarter of an
  H100's SMs. The split multiplies the blocks in flight by `splits`, and the partial sums' addition
  fuses into the consumer (the residual add, RoPE). `splits=1` is the plain product."""
  lead, out = x.shape[:-n_contract], w.shape[n_contract:]
  k = math.prod(x.shape[-n_contract:])
  if w.shape[:n_contract] != x.shape[-n_contract:] or k % splits:
    raise ValueError(f"split_k_product: x {x.shape} and w {w.shape} must share {n_contract} contracted axes "
                     f"whose size divides into splits={splits}")
  out_dtype = x.dtype if out_dtype is None else out_dtype
  if splits == 1 and out_dtype == x.dtype:
    return jnp.tensordot(x, w, n_contract)
  xs = x.reshape(*lead, splits, k // splits)
  ws = w.reshape(splits, k // splits, math.prod(out))
  partial = einsum_f32("...sk,skn->s...n", xs, ws)
  # A chain of elementwise adds, not a reduction over the parts: the form in which XLA fuses the sum
  # into its consumer, and a residual add with the RMS reduction after it, most readily.
  total = partial[0]
  for part in range(1, splits):
    total = total + partial[part]
  return total.reshape(*lead, *out).astype(out_dtype)


def on_one_gpu(plan: ShardingPlan) -> bool:
  """Whether the plan's mesh is a single GPU (what `model.decode_attention` and
  `model.decode_split_k` resolve "auto" by)."""
  return plan.mesh.size == 1 and plan.mesh.devices.flat[0].platform == "gpu"


def decode_split(cfg: ModelConfig, new_tokens: int, plan: ShardingPlan) -> int:
  """`model.decode_split_k` for a decode step's products (one new token per row) on one device,
  else 1 (the split would cut sharded contractions; the serving runner refuses that combination).
  0 (auto): 4 on one GPU (or the largest of 2 and 1 dividing every contraction), else 1."""
  if new_tokens != 1 or plan.mesh.size != 1:
    return 1
  if cfg.decode_split_k:
    return cfg.decode_split_k
  widths = (cfg.d_model, cfg.n_heads * cfg.resolved_head_dim, cfg.d_ff)
  return next(k for k in (4, 2, 1) if all(n % k == 0 for n in widths)) if on_one_gpu(plan) else 1


def scaled_product(x: jax.Array, w: jax.Array, splits: int, row_scale: jax.Array | None, dtype: Any) -> jax.Array:
  """x [B, L, D] times w [D, ...] (`split_k_product`, float32 sums), each row times its factor
  ([B, L, 1]: the fused layout's `rms_factor`; None: none), in `dtype`."""
  y = split_k_product(x, w, 1, splits, jnp.float32)
  if row_scale is not None:
    y = y * row_scale.reshape(row_scale.shape + (1,) * (y.ndim - row_scale.ndim))
  return y.astype(dtype)


def rms_factor(x_BxLxD: jax.Array, eps: float) -> jax.Array:
  """1 / rms(x) over the last axis in float32, kept as an axis of size 1: rms_norm(x, scale) is
  x * rms_factor(x) * scale. The fused layout (`models.fused`) folds `scale` into the weight that
  follows and multiplies this factor into that product's output instead."""
  x = x_BxLxD.astype(jnp.float32)
  return jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def rms_norm(x_BxLxD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
  """x / rms(x) * scale, computed in float32, returned in x's dtype (Zhang & Sennrich 2019)."""
  x = x_BxLxD.astype(jnp.float32) * rms_factor(x_BxLxD, eps)
  return (x * scale_D.astype(jnp.float32)).astype(x_BxLxD.dtype)


class RMSNorm(nnx.Module):
  """`rms_norm` with a learned scale."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.eps = cfg.norm_eps
    self.scale = param(rngs, (cfg.d_model,), ("embed",), cfg, init="ones")

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    return rms_norm(x_BxLxD, self.scale[...], self.eps)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  """Inverse RoPE frequencies [head_dim/2], with Llama-3 frequency scaling when factor > 1."""
  hd = cfg.resolved_head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  factor = cfg.rope_scaling_factor
  if factor == 1.0:
    return inv
  low_wavelen = cfg.rope_original_max_len / cfg.rope_low_freq_factor
  high_wavelen = cfg.rope_original_max_len / cfg.rope_high_freq_factor
  wavelen = 2 * math.pi / inv
  # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
  scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
  smooth = (cfg.rope_original_max_len / wavelen - cfg.rope_low_freq_factor) / (
      cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(medium, smoothed, scaled)


def apply_rope(x_BxLxHxD: jax.Array, positions_BxL: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates halves (x1, x2) of each head by position * frequency (the Hugging Face Llama layout)."""
  angles = positions_BxL[..., None].astype(jnp.float32) * inv_freq  # [B, L, D/2]
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
  x = x_BxLxHxD.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxD.dtype)


def _swiglu_f32(gate: jax.Array, up: jax.Array) -> jax.Array:
  g = gate.astype(jnp.float32)
  return (g * jax.nn.sigmoid(g) * up.astype(jnp.float32)).astype(gate.dtype)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """silu(gate) * up, computed in float32 and returned in the inputs' dtype.

  The backward pass is written out so that XLA emits it as one elementwise pass (read gate, up
  and the incoming gradient; write both gradients). Differentiating the expression instead
  leaves autodiff's partial sums as separate passes over [tokens, d_ff] arrays.
  """
  return _swiglu_f32(gate, up)


def _swiglu_fwd(gate, up):
  return _swiglu_f32(gate, up), (gate, up)


def _swiglu_bwd(residuals, dout):
  gate, up = residuals
  g, u, d = gate.astype(jnp.float32), up.astype(jnp.float32), dout.astype(jnp.float32)
  sig = jax.nn.sigmoid(g)
  d_gate = d * u * sig * (1.0 + g * (1.0 - sig))  # d silu(g) / dg = sig * (1 + g (1 - sig))
  d_up = d * g * sig
  return d_gate.astype(gate.dtype), d_up.astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)); gate/up column-parallel, down row-parallel over `mlp`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, fused: bool = False):
    """`fused`: gate and up as one weight `w_gate_up` [D, 2, F] (`models.fused`), one product."""
    d, f = cfg.d_model, cfg.d_ff
    self.dtype = jnp.dtype(cfg.compute_dtype)
    self.fused = fused
    if fused:
      self.w_gate_up = param(rngs, (d, 2, f), ("embed", None, "mlp"), cfg)
    else:
      self.w_gate = param(rngs, (d, f), ("embed", "mlp"), cfg)
      self.w_up = param(rngs, (d, f), ("embed", "mlp"), cfg)
    self.w_down = param(rngs, (f, d), ("mlp", "embed"), cfg)

  def __call__(self, x_BxLxD: jax.Array, plan: ShardingPlan, split_k: int = 1,
               row_scale: jax.Array | None = None) -> jax.Array:
    """`split_k`: the products' contractions cut into parts (`split_k_product`; decode only; gate/up
    only in the fused layout). `row_scale` [B, L, 1]: the fused layout's RMSNorm factor
    (`rms_factor`; the norm's scale is folded into `w_gate_up`), multiplied into gate and up."""
    x = x_BxLxD.astype(self.dtype)
    if self.fused:
      y = scaled_product(x, self.w_gate_up[...].astype(self.dtype), split_k, row_scale, self.dtype)
      gate, up = y[:, :, 0], y[:, :, 1]
    else:
      gate = jnp.einsum("bld,df->blf", x, self.w_gate[...].astype(self.dtype))
      up = jnp.einsum("bld,df->blf", x, self.w_up[...].astype(self.dtype))
    h_BxLxF = plan.constrain(swiglu(gate, up), ("batch", "length", "mlp"))
    if split_k > 1:
      return split_k_product(h_BxLxF, self.w_down[...].astype(self.dtype), 1, split_k)
    return jnp.einsum("blf,fd->bld", h_BxLxF, self.w_down[...].astype(self.dtype))
