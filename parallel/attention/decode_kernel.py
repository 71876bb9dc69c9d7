"""One decode step's attention in one GPU kernel: a Pallas (Triton) kernel for a single new token
per row over that row's cached keys and values and itself.

A batch-1 decode step of the `1b` preset is bound by kernel count as much as by bytes
(BENCHMARKS.md, "Decode, profiled"): in XLA one token's attention over its cache is two skinny
batched matmuls (scores, then probabilities x values), the new token's own score and value, the
length mask, and a softmax split into reductions and elementwise passes, several kernels of 1 to 3
us each per layer. Here it is one launch per layer: one program per (row, kv head) streams the
row's cache positions in blocks of `block_s`, with a running maximum and sum (the online softmax
of FlashAttention), the new token's key and value folded in first. Positions past the row's length
are masked off in the loads, so they are never read from memory.

  decode_attention(q [B, H, D], k_new [B, K, D], v_new [B, K, D], cache_k [B, K, S, D],
                   cache_v [B, K, S, D], cache_len [B]) -> [B, H, D]

Query heads group over kv heads (GQA, H = K x G): head h reads kv head h // G, as
`models.cache.attend_with_cache` reads them. Products run on tensor cores with float32 sums; the
G query heads of a kv head are padded to 16 rows (a tensor-core product's minimum). Probabilities
are rounded to the cache's dtype before they multiply the values (as the XLA path does), but before
the division by the softmax sum (FlashAttention's order), so the two differ by rounding in bf16
and agree to float32 rounding in float32.

`interpret=True` runs the kernel anywhere (the CPU tests).

Status (BENCHMARKS.md, "One kernel for a decode step's attention"): on one H100 it made a batch-1
`1b` decode step slower, 1.34 against XLA's 1.19 ms. A batch-1 step gives it 16 programs (rows x kv
heads) for 132 SMs, each streaming its positions block after block (17 us per layer), and XLA
copies each layer's cache slice into a buffer of its own before the call. Positions split over
more programs (flash-decoding, with a combine of the partial softmaxes) and the stacked cache read
in place are the next steps; until then `model.decode_attention` defaults to XLA's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

F32 = jnp.float32
MIN_ROWS = 16  # a tensor-core product's smallest M


def block_size(span: int, largest: int = 128) -> int:
  """The largest power of two <= `largest` that divides the cache's positions `span` (0 if below 16:
  too small a block for a tensor-core product; the caller then keeps XLA's attention)."""
  b = largest
  while b >= MIN_ROWS and span % b:
    b //= 2
  return b if b >= MIN_ROWS else 0


def tiles(span: int, head_dim: int) -> bool:
  """Whether the kernel can run a cache of `span` positions and heads of `head_dim` (else XLA's)."""
  return block_size(span) > 0 and head_dim & (head_dim - 1) == 0


@functools.lru_cache(maxsize=None)
def _compiler_params(num_warps: int, num_stages: int):
  from jax.experimental.pallas import triton as plt  # noqa: PLC0415 - only where a kernel is built

  return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _kernel(len_ref, q_ref, kn_ref, vn_ref, k_ref, v_ref, o_ref, *, block_s: int, scale: float):
  from jax.experimental.pallas import triton as plt  # noqa: PLC0415 - masked loads

  b, h = pl.program_id(0), pl.program_id(1)
  q = q_ref[...]  # [R, D]: this kv head's query heads, padded to R rows
  length = len_ref[pl.ds(b, 1)][0]
  k_new = kn_ref[pl.ds(b, 1), pl.ds(h, 1), :][0].astype(F32)  # [1, D]
  v_new = vn_ref[pl.ds(b, 1), pl.ds(h, 1), :][0].astype(F32)
  m = jnp.sum(q.astype(F32) * k_new, axis=1) * scale  # [R]: the new token's score opens the softmax
  total = jnp.ones_like(m)
  acc = jnp.broadcast_to(v_new, (q.shape[0], v_new.shape[1]))
  nt = (((1,), (1,)), ((), ()))
  d = q.shape[1]

  def block(i, state):
    # A loop of static length (one Triton can pipeline) whose loads past the row's length are
    # masked off: those positions are never read from memory.
    m, total, acc = state
    at = pl.ds(pl.multiple_of(i * block_s, block_s), block_s)
    position = i * block_s + jnp.arange(block_s, dtype=jnp.int32)
    valid = position < length
    mask = jnp.broadcast_to(valid[None, None, :, None], (1, 1, block_s, d))
    load = lambda ref: plt.load(ref.at[pl.ds(b, 1), pl.ds(h, 1), at, :], mask=mask, other=0)[0, 0]
    keys = load(k_ref)  # [block_s, D]
    s = jax.lax.dot_general(q, keys, nt, preferred_element_type=F32) * scale  # [R, block_s]
    s = jnp.where(valid[None, :], s, jnp.finfo(F32).min)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    values = load(v_ref)
    pv = jax.lax.dot_general(p.astype(values.dtype), values, (((1,), (0,)), ((), ())), preferred_element_type=F32)
    return m_new, total * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + pv

  m, total, acc = jax.lax.fori_loop(0, k_ref.shape[2] // block_s, block, (m, total, acc))
  o_ref[...] = (acc / total[:, None]).astype(o_ref.dtype)


def decode_attention(q_BxHxD: jax.Array, k_new_BxKxD: jax.Array, v_new_BxKxD: jax.Array, cache_k_BxKxSxD: jax.Array,
                     cache_v_BxKxSxD: jax.Array, cache_len_B: jax.Array, *, block_s: int | None = None,
                     num_warps: int = 4, num_stages: int = 2, interpret: bool = False) -> jax.Array:
  """Softmax attention of one new token per row over cached positions [0, cache_len) and itself
  (module docstring). `block_s` (default: `block_size(S)`) must be a power of two >= 16 dividing S."""
  b, h, d = q_BxHxD.shape
  _, kv, s, _ = cache_k_BxKxSxD.shape
  if cache_k_BxKxSxD.shape != (b, kv, s, d) or cache_v_BxKxSxD.shape != (b, kv, s, d):
    raise ValueError(f"decode_attention: cache k and v must be [B={b}, K, S, D={d}], got "
                     f"{cache_k_BxKxSxD.shape} and {cache_v_BxKxSxD.shape}")
  if k_new_BxKxD.shape != (b, kv, d) or v_new_BxKxD.shape != (b, kv, d):
    raise ValueError(f"decode_attention: new k and v must be [B={b}, K={kv}, D={d}], got "
                     f"{k_new_BxKxD.shape} and {v_new_BxKxD.shape}")
  if h % kv:
    raise ValueError(f"decode_attention: {h} query heads do not group over {kv} key/value heads")
  if cache_len_B.shape != (b,):
    raise ValueError(f"decode_attention: cache_len must be [B={b}], got {cache_len_B.shape}")
  block_s = block_size(s) if block_s is None else block_s
  if block_s < MIN_ROWS or block_s & (block_s - 1) or s % block_s:
    raise ValueError(f"decode_attention: block_s={block_s} must be a power of two >= {MIN_ROWS} dividing "
                     f"the cache's {s} positions")
  if d & (d - 1):
    raise ValueError(f"decode_attention: head dim {d} must be a power of two (a Triton block)")
  g = h // kv
  rows = max(MIN_ROWS, pl.next_power_of_2(g))
  q = jnp.pad(q_BxHxD.reshape(b, kv, g, d), ((0, 0), (0, 0), (0, rows - g), (0, 0))).astype(cache_k_BxKxSxD.dtype)
  whole = lambda shape: pl.BlockSpec(shape, lambda i, j: (0,) * len(shape))
  per_head = pl.BlockSpec((None, None, rows, d), lambda i, j: (i, j, 0, 0))
  kernel = functools.partial(_kernel, block_s=block_s, scale=d ** -0.5)
  out = pl.pallas_call(
      kernel, grid=(b, kv), out_shape=jax.ShapeDtypeStruct((b, kv, rows, d), q_BxHxD.dtype),
      in_specs=[whole((b,)), per_head, whole((b, kv, d)), whole((b, kv, d)), whole((b, kv, s, d)),
                whole((b, kv, s, d))],
      out_specs=per_head, interpret=interpret,
      compiler_params=None if interpret else _compiler_params(num_warps, num_stages))(
          cache_len_B.astype(jnp.int32), q, k_new_BxKxD, v_new_BxKxD, cache_k_BxKxSxD, cache_v_BxKxSxD)
  return out[:, :, :g].reshape(b, h, d)
