"""Grouped-query self-attention with RoPE, softmax or decayed linear; the attention op itself comes
from the plan's dispatch (`parallel.attention` or `parallel.linear`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from configs import ModelConfig
from models.cache import attend_with_cache
from models.layers import apply_rope, decode_split, on_one_gpu, param, rms_norm, rope_inv_freq, scaled_product, split_k_product
from parallel.attention.decode_kernel import decode_attention, tiles
from parallel.attention.dispatch import attend
from parallel.linear.dispatch import linear_attend
from parallel.linear.linear_attention import decay_rates
from parallel.plan import ShardingPlan


# The fused q/k/v weight [D, K, H/K + 2, hd] (`models.fused`): split over kv heads, so under tensor
# parallelism each device holds its kv heads' keys and values and the query heads that read them.
QKV_AXES = ("embed", "kv_heads", None, "head_dim")


def resolve_implementation(cfg: ModelConfig) -> str:
  """"auto" picks cuDNN flash attention where it exists (NVIDIA GPUs, bf16), else XLA."""
  if cfg.attention_impl != "auto":
    return cfg.attention_impl
  on_gpu = jax.default_backend() == "gpu"
  return "cudnn" if on_gpu and cfg.compute_dtype == "bfloat16" else "xla"


def layer_kinds(cfg: ModelConfig) -> tuple[str, ...]:
  """"S" (softmax) or "L" (linear) for each layer: `model.layer_pattern` repeated."""
  return tuple(cfg.layer_pattern * (cfg.n_layers // len(cfg.layer_pattern)))


def _rms_per_head(o_BxLxHxD: jax.Array, eps: float) -> jax.Array:
  """Linear attention's outputs grow with the decayed history; RetNet normalises each head."""
  return o_BxLxHxD * jax.lax.rsqrt(jnp.mean(o_BxLxHxD * o_BxLxHxD, axis=-1, keepdims=True) + eps)


class Attention(nnx.Module):
  """Megatron layout: q/k/v column-parallel over heads, the output projection row-parallel.

  Options of Qwen-family checkpoints: `model.qkv_bias` adds biases [H, hd] / [K, hd] to the q/k/v
  projections (Qwen2, Qwen2-MoE); `model.qk_norm` RMS-normalises each head's query and key vectors
  with learned scales [hd] before RoPE (Qwen3, Qwen3-MoE).

  The same projections serve softmax attention and decayed linear attention (RetNet-style: RoPE
  on q and k, a fixed decay per key/value head, each head's output RMS-normalised), so a hybrid
  model's layers share one parameter structure and scan as one stack.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, fused: bool = False):
    """`fused`: q, k and v as one weight (`models.fused`), one matrix product instead of three."""
    d, h, k, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
    self.cfg = cfg
    self.dtype = jnp.dtype(cfg.compute_dtype)
    self.implementation = resolve_implementation(cfg)
    self.fused = fused
    if fused:
      self.wqkv = param(rngs, (d, k, h // k + 2, hd), QKV_AXES, cfg)
    else:
      self.wq = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), cfg)
      self.wk = param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), cfg)
      self.wv = param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), cfg)
    self.wo = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), cfg)
    # Qwen-family options; absent (no parameters at all) when off, so dense Llama trees are unchanged.
    if cfg.qkv_bias:  # Qwen2: q/k/v projections with biases, initialised to zero
      zeros = lambda shape, axes: nnx.Param(jnp.zeros(shape, jnp.dtype(cfg.param_dtype)), logical_axes=axes)
      if fused:
        self.bqkv = zeros((k, h // k + 2, hd), QKV_AXES[1:])
      else:
        self.bq = zeros((h, hd), ("heads", "head_dim"))
        self.bk = zeros((k, hd), ("kv_heads", "head_dim"))
        self.bv = zeros((k, hd), ("kv_heads", "head_dim"))
    if cfg.qk_norm:  # Qwen3: RMSNorm over each head's query and key vectors, before RoPE
      self.q_norm = param(rngs, (hd,), ("head_dim",), cfg, init="ones")
      self.k_norm = param(rngs, (hd,), ("head_dim",), cfg, init="ones")

  def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array, segment_ids_BxL: jax.Array | None,
               plan: ShardingPlan, linear: bool | jax.Array = False, row_scale: jax.Array | None = None) -> jax.Array:
    """`linear`: a Python bool, or a traced one (a hybrid stack's per-layer kind). `row_scale`: the
    fused layout's RMSNorm factor (`project_qkv`)."""
    q, k, v = self.project_qkv(x_BxLxD, positions_BxL, plan, row_scale=row_scale)

    def softmax():
      return attend(q, k, v, segment_ids_BxL, plan=plan, implementation=self.implementation)

    def decayed_linear():
      o = linear_attend(q, k, v, segment_ids_BxL, jnp.asarray(decay_rates(self.cfg.n_kv_heads)), plan=plan,
                        chunk=self.cfg.linear_chunk)
      return _rms_per_head(o, self.cfg.norm_eps).astype(self.dtype)

    if isinstance(linear, bool):
      out_BxLxHxD = decayed_linear() if linear else softmax()
    else:
      out_BxLxHxD = jax.lax.cond(linear, decayed_linear, softmax)
    return self.project_out(out_BxLxHxD, plan)

  def project_qkv(self, x_BxLxD: jax.Array, positions_BxL: jax.Array, plan: ShardingPlan,
                  split_k: int = 1, row_scale: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [B, L, H, D], k and v [B, L, K, D], RoPE applied to q and k. `split_k`: the products'
    contraction cut into parts (`models.layers.split_k_product`; decode only). `row_scale` [B, L, 1]:
    the fused layout's RMSNorm factor (`models.layers.rms_factor`; the norm's scale is folded into
    `wqkv`), multiplied into the product before the biases."""
    x = x_BxLxD.astype(self.dtype)
    w = lambda p: p[...].astype(self.dtype)

    def product(spec, weight):
      if split_k == 1 and row_scale is None:
        return jnp.einsum(spec, x, weight)
      return scaled_product(x, weight, split_k, row_scale, self.dtype)

    def project(p, bias, axes):
      y = product("bld,dhk->blhk", w(p))
      return plan.constrain(y if bias is None else y + w(bias), ("batch", "length") + axes)

    if self.fused:
      q, k, v = self._project_fused(product("bld,dkgh->blkgh", w(self.wqkv)), w, plan)
    else:
      biases = (self.bq, self.bk, self.bv) if self.cfg.qkv_bias else (None, None, None)
      q = project(self.wq, biases[0], ("heads", "head_dim"))
      k = project(self.wk, biases[1], ("kv_heads", "head_dim"))
      v = project(self.wv, biases[2], ("kv_heads", "head_dim"))
    if self.cfg.qk_norm:
      q, k = rms_norm(q, self.q_norm[...], self.cfg.norm_eps), rms_norm(k, self.k_norm[...], self.cfg.norm_eps)
    inv_freq = rope_inv_freq(self.cfg)
    return apply_rope(q, positions_BxL, inv_freq), apply_rope(k, positions_BxL, inv_freq), v

  def _project_fused(self, y, w, plan):
    """q, k, v from the product `y` [B, L, K, H/K + 2, hd] of x with `wqkv` [D, K, H/K + 2, hd]:
    each kv head's query heads, then its key and its value."""
    if self.cfg.qkv_bias:
      y = y + w(self.bqkv)
    y = plan.constrain(y, ("batch", "length") + QKV_AXES[1:])
    b, l, k, n, hd = y.shape  # n: the query heads per kv head, + 2
    q = plan.constrain(y[:, :, :, :n - 2].reshape(b, l, k * (n - 2), hd), ("batch", "length", "heads", "head_dim"))
    return q, y[:, :, :, n - 2], y[:, :, :, n - 1]

  def project_out(self, out_BxLxHxD: jax.Array, plan: ShardingPlan, split_k: int = 1) -> jax.Array:
    out_BxLxHxD = plan.constrain(out_BxLxHxD, ("batch", "length", "heads", "head_dim"))
    if split_k > 1:
      return split_k_product(out_BxLxHxD, self.wo[...].astype(self.dtype), 2, split_k)
    return jnp.einsum("blhk,hkd->bld", out_BxLxHxD, self.wo[...].astype(self.dtype))

  def with_cache(self, x_BxTxD: jax.Array, positions_BxT: jax.Array, cache: dict, cache_len_B: jax.Array,
                 plan: ShardingPlan, row_scale: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Softmax attention of T new tokens per row over the row's KV-cache slice (`cache`: {"k", "v":
    [B, K, S, D]}, or every layer's [L, B, K, S, D] and this one's index {"layer"}; `cache_len_B`
    positions valid) and themselves (`models.cache`). Returns the
    output [B, T, D] and the new tokens' {"k", "v"} [B, T, K, D] for the cache, or, when the decode
    kernel writes them itself (`cache["write_positions"]` [B] given: each row's position, past the
    span for a row that writes nothing), {"cache": the updated {"k", "v"}}.

    A decode step (T == 1) on one device cuts its products' contractions into
    `model.decode_split_k` parts (`models.layers.split_k_product`). `row_scale`: as `project_qkv`."""
    split_k = decode_split(self.cfg, x_BxTxD.shape[1], plan)
    q, k, v = self.project_qkv(x_BxTxD, positions_BxT, plan, split_k, row_scale)
    layer = cache.get("layer")  # set: cache["k"], cache["v"] are every layer's (`reads_cache_in_place`)
    page_table = cache.get("page_table")  # set: they are pages, read in place (`reads_pages_in_place`)
    if self._decode_kernel(x_BxTxD.shape[1], cache["k"].shape[-2], plan):
      writes = cache.get("write_positions")
      out = decode_attention(q[:, 0], k[:, 0], v[:, 0], cache["k"], cache["v"], cache_len_B, layer=layer,
                             page_table=page_table, write_positions=writes, interpret=jax.default_backend() == "cpu")
      if writes is not None:  # the kernel wrote the new keys and values into the cache it read
        out, cache_k, cache_v = out
        return self.project_out(out[:, None], plan, split_k), {"cache": {"k": cache_k, "v": cache_v}}
      out = out[:, None]
    elif page_table is not None:
      raise ValueError("a paged cache read in place needs the decode kernel: one new token per row, "
                       "model.decode_attention='pallas' on one device, pages a multiple of 16 positions")
    else:
      own = (lambda a: a) if layer is None else (lambda a: a[layer])
      out = attend_with_cache(q, k, v, own(cache["k"]), own(cache["v"]), cache_len_B)
    return self.project_out(out, plan, split_k), {"k": k, "v": v}

  def _decode_kernel(self, new_tokens: int, span: int, plan: ShardingPlan) -> bool:
    """With `model.decode_attention='pallas'` (or 'auto' on one GPU), one new token per row runs the one-kernel decode
    attention (`parallel.attention.decode_kernel`) instead of XLA's; not for spans or head dims the
    kernel cannot tile, nor on a mesh of several devices (the kernel is not partitioned; the
    serving runner refuses that combination)."""
    return new_tokens == 1 and reads_cache_in_place(self.cfg, plan) and tiles(span, self.cfg.resolved_head_dim)


def reads_cache_in_place(cfg: ModelConfig, plan: ShardingPlan) -> bool:
  """Whether a decoder's layers read the stacked KV cache in place (`model.decode_attention='pallas'`
  on one device, or 'auto' on one GPU: the kernel indexes the layer itself) rather than each its own
  slice."""
  kind = cfg.decode_attention
  return plan.mesh.size == 1 and (kind == "pallas" or (kind == "auto" and on_one_gpu(plan)))


def reads_pages_in_place(cfg: ModelConfig, plan: ShardingPlan, page_size: int) -> bool:
  """Whether a decode step reads a paged cache's pages in place (the decode kernel with a page
  table, `reads_cache_in_place` and pages it can tile) rather than gathered into contiguous rows."""
  return reads_cache_in_place(cfg, plan) and tiles(page_size, cfg.resolved_head_dim)
