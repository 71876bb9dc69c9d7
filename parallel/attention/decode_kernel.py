"""One decode step's attention in one GPU kernel: a Pallas (Triton) kernel for a single new token
per row over that row's cached keys and values and itself.

A batch-1 decode step of the `1b` preset is bound by kernel count as much as by bytes
(BENCHMARKS.md, "Decode, profiled"): in XLA one token's attention over its cache is two skinny
batched matmuls (scores, then probabilities x values), the new token's own score and value, the
length mask, and a softmax split into reductions and elementwise passes, several kernels of 1 to 3
us each per layer. Here it is one launch per layer: one program per (row, kv head, part of the
positions) streams its positions in blocks of `block_s`, with a running maximum and sum (the online
softmax of FlashAttention); part 0 folds the new token's key and value in first. Positions past the
row's length are masked off in the loads, so they are never read from memory. The parts' partial
softmaxes then combine in a second, small launch (flash-decoding): a batch-1 step has only rows x
kv heads = 16 (row, head) pairs, and one program streaming a head's whole span runs at a fraction of
an SM's share of the bandwidth. The new token's query heads, key and value reach the kernel as one
block per (row, kv head), so that XLA writes them in one fusion.

  decode_attention(q [B, H, D], k_new [B, K, D], v_new [B, K, D], cache_k [B, K, S, D],
                   cache_v [B, K, S, D], cache_len [B]) -> [B, H, D]

or, with `layer=`, caches of every layer [L, B, K, S, D], read in place: XLA copies a slice handed
to a custom call into a buffer of its own first (a layer's span of keys and of values, every step).
With `page_table=` [B, P] the caches are pages ([L,] pages, K, page_size, D; `models.paged_cache`):
row b's position p lives in page page_table[b, p // page_size] at offset p % page_size, and the
kernel reads each block of positions from its page in place (vLLM's PagedAttention), so a paged
cache is never gathered into a contiguous copy. A block then lies inside one page (block_s divides
page_size), and the span is P x page_size.

Query heads group over kv heads (GQA, H = K x G): head h reads kv head h // G, as
`models.cache.attend_with_cache` reads them. Products run on tensor cores with float32 sums; the
G query heads of a kv head are padded to 16 rows (a tensor-core product's minimum). Probabilities
are rounded to the cache's dtype before they multiply the values (as the XLA path does), but before
the division by the softmax sum (FlashAttention's order), so the two differ by rounding in bf16
and agree to float32 rounding in float32.

`interpret=True` runs the kernel anywhere (the CPU tests).

Status (BENCHMARKS.md, "One kernel for a decode step's attention"): the first version (one program
per row and kv head, each layer's slice copied) made a batch-1 `1b` decode step slower on one
H100, 1.34 against XLA's 1.19 ms: 16 programs for 132 SMs, 17 us per layer, plus the copies. With
the parts and the in-place read the kernel takes 4.2 us per layer and the step 1.12 ms (1.08 ms
with `model.decode_split_k=4`), against XLA's 1.18 ms on the same H100. With one packed block, the
combine in its own launch and the cache written here ("Fewer kernels per decode step") the step
takes 0.99 ms, and `model.decode_attention='auto'` (the default) runs the kernel on one GPU.
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


def default_splits(rows: int, kv_heads: int, span: int, programs: int = 256) -> int:
  """Parts of the positions axis for `decode_attention`: enough that rows x kv heads x parts reach
  about `programs` (every SM busy, and then some), each part a whole number of blocks of at least
  `MIN_ROWS` positions (so `tiles(span, ...)` implies a valid split)."""
  p = 1
  while rows * kv_heads * p * 2 <= programs and span % (p * 2) == 0 and block_size(span // (p * 2)) > 0:
    p *= 2
  return p


def _kernel(len_ref, write_ref, table_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, sum_ref, *cache_out,
            groups: int, block_s: int, chunk: int, page_size: int, pages: int, scale: float):
  """One program: row b, kv head h, positions [p * chunk, (p + 1) * chunk) of one layer of the
  stacked cache. Writes the part's unnormalised output, running maximum and sum; part 0 also folds
  in the new token. `page_size` > 0: the cache is `pages` pages and `table_ref` row b's table.
  `q_ref` [R, D]: this kv head's `groups` query heads, the new token's key, its value, the layer's
  index (`_packed`), then zeros (the rows past the queries compute outputs nobody reads). With
  `cache_out` (the caches' outputs, the same buffers as `k_ref` and `v_ref`), part 0 also writes the
  new key and value at the row's position `write_ref[b]` (none past the span: an inactive row)."""
  from jax.experimental.pallas import triton as plt  # noqa: PLC0415 - masked loads

  b, h, part = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  q = q_ref[...]
  length = len_ref[pl.ds(b, 1)][0]
  code = lambda i: q_ref[pl.ds(groups + 2, 1), pl.ds(i, 1)][0, 0].astype(F32)
  layer = (code(0) * 256 + code(1)).astype(jnp.int32)
  k_new = q_ref[pl.ds(groups, 1), :].astype(F32)  # [1, D]
  v_new = q_ref[pl.ds(groups + 1, 1), :].astype(F32)
  first = part == 0
  # Part 0 opens with the new token's score; the others start empty (their maximum at float32's
  # lowest, so a part with no valid position weighs exp(lowest - real maximum) = 0 in the combine).
  # (Selects on whole tensors: Triton's lowering cannot multiply by a float made from a bool.)
  score = jnp.sum(q.astype(F32) * k_new, axis=1) * scale  # [R]
  m = jnp.where(first, score, jnp.full_like(score, jnp.finfo(F32).min))
  total = jnp.where(first, jnp.ones_like(score), jnp.zeros_like(score))
  v_rows = jnp.broadcast_to(v_new, (q.shape[0], v_new.shape[1]))
  acc = jnp.where(first, v_rows, jnp.zeros_like(v_rows))
  nt = (((1,), (1,)), ((), ()))
  d = q.shape[1]
  start = part * chunk

  def locate(first_position):
    """(index on the cache's second axis, offset on its positions axis) of a block's first position:
    (row, position) in a contiguous cache, (page, offset in the page) in a paged one."""
    if not page_size:
      return b, pl.multiple_of(first_position, block_s)
    entry = table_ref[pl.ds(b, 1), pl.ds(first_position // page_size, 1)][0, 0]
    # Entries past a row's pages hold `pages` (unassigned): clipped, and their positions are masked.
    return jnp.minimum(entry, pages - 1), pl.multiple_of(first_position % page_size, block_s)

  def block(i, state):
    # A loop of static length (one Triton can pipeline) whose loads past the row's length are
    # masked off: those positions are never read from memory.
    m, total, acc = state
    position = start + i * block_s + jnp.arange(block_s, dtype=jnp.int32)
    valid = position < length
    mask = jnp.broadcast_to(valid[None, None, None, :, None], (1, 1, 1, block_s, d))
    where, offset = locate(start + i * block_s)
    at = (pl.ds(layer, 1), pl.ds(where, 1), pl.ds(h, 1), pl.ds(offset, block_s), slice(None))
    load = lambda ref: plt.load(ref.at[at], mask=mask, other=0)[0, 0, 0]
    keys = load(k_ref)  # [block_s, D]
    s = jax.lax.dot_general(q, keys, nt, preferred_element_type=F32) * scale  # [R, block_s]
    s = jnp.where(valid[None, :], s, jnp.finfo(F32).min)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(valid[None, :], jnp.exp(s - m_new[:, None]), 0.0)
    values = load(v_ref)
    pv = jax.lax.dot_general(p.astype(values.dtype), values, (((1,), (0,)), ((), ())), preferred_element_type=F32)
    return m_new, total * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + pv

  m, total, acc = jax.lax.fori_loop(0, chunk // block_s, block, (m, total, acc))
  # Only the query heads' rows are written (the other rows' results are never read): an eighth of
  # the bytes at the `1b` preset's 2 heads per kv head.
  heads = jnp.arange(q.shape[0]) < groups
  plt.store(acc_ref, acc, mask=jnp.broadcast_to(heads[:, None], acc.shape))
  plt.store(m_ref, m, mask=heads)
  plt.store(sum_ref, total, mask=heads)
  if cache_out:
    span = table_ref.shape[1] * page_size if page_size else k_ref.shape[3]  # a row's positions
    position = write_ref[pl.ds(b, 1)][0]
    keep = first & (position < span)
    position = jnp.minimum(position, span - 1)
    if page_size:
      entry = table_ref[pl.ds(b, 1), pl.ds(position // page_size, 1)][0, 0]
      keep &= entry < pages  # an unassigned page: nothing written
      where, offset = jnp.minimum(entry, pages - 1), position % page_size
    else:
      where, offset = b, position
    at = (pl.ds(layer, 1), pl.ds(where, 1), pl.ds(h, 1), pl.ds(offset, 1), slice(None))
    for ref, row in zip(cache_out, (groups, groups + 1)):
      plt.store(ref.at[at], q_ref[pl.ds(row, 1), :][None, None, None], mask=jnp.broadcast_to(keep, (1, 1, 1, 1, d)))


def _combine_kernel(acc_ref, m_ref, sum_ref, out_ref):
  """One program per (row, kv head, query head of it): the parts' partial softmaxes combined, each
  rescaled to the overall maximum (a part with no valid position weighs 0), then one division by
  the overall sum."""
  m = m_ref[...]  # [P]
  weight = jnp.exp(m - jnp.max(m))
  out = jnp.sum(acc_ref[...] * weight[:, None], axis=0) / jnp.sum(sum_ref[...] * weight)
  out_ref[...] = out.astype(out_ref.dtype)


def _packed(q_BxKxGxD: jax.Array, k_new_BxKxD: jax.Array, v_new_BxKxD: jax.Array, layer: jax.Array | None,
            rows: int, dtype) -> jax.Array:
  """The kernel's one input block per (row, kv head), [B, K, rows, D] in the cache's dtype: its G
  query heads, the new key, the new value, the layer's index, zeros. One XLA fusion writes it (with
  RoPE and the parts of a split product summed) instead of three, and the index rides in it rather
  than in a buffer of its own, which XLA would write with a kernel of its own for every layer. The
  index is two integers below 256 (exact in bf16): layer // 256, layer % 256."""
  b, kv, g, d = q_BxKxGxD.shape
  layer = jnp.zeros((), jnp.int32) if layer is None else jnp.asarray(layer, jnp.int32).reshape(())
  column = jnp.arange(d)
  code = jnp.where(column == 0, layer // 256, jnp.where(column == 1, layer % 256, 0)).astype(dtype)
  code = jnp.broadcast_to(code, (b, kv, 1, d))
  packed = jnp.concatenate([q_BxKxGxD.astype(dtype), k_new_BxKxD[:, :, None].astype(dtype),
                            v_new_BxKxD[:, :, None].astype(dtype), code], axis=2)
  return jnp.pad(packed, ((0, 0), (0, 0), (0, rows - g - 3), (0, 0)))


def decode_attention(q_BxHxD: jax.Array, k_new_BxKxD: jax.Array, v_new_BxKxD: jax.Array, cache_k_BxKxSxD: jax.Array,
                     cache_v_BxKxSxD: jax.Array, cache_len_B: jax.Array, *, layer: jax.Array | None = None,
                     page_table: jax.Array | None = None, write_positions: jax.Array | None = None,
                     splits: int | None = None, block_s: int | None = None, num_warps: int = 4, num_stages: int = 2,
                     interpret: bool = False) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
  """Softmax attention of one new token per row over cached positions [0, cache_len) and itself
  (module docstring). The positions split into `splits` parts (default `default_splits`), each a
  program per row and kv head, whose partial softmaxes combine afterwards (flash-decoding);
  `block_s` (default: `block_size` of a part, and of a page) must be a power of two >= 16 dividing a
  part (and a page).

  `layer` (an int32 scalar): the caches are every layer's, stacked [L, B, K, S, D], and the kernel
  reads this layer's in place (a slice handed to a custom call would be copied out first).
  `page_table` (int32 [B, P]): the caches are pages [pages, K, page_size, D] ([L, ...] with `layer`)
  and row b's positions lie in the pages its table lists (module docstring).

  `write_positions` (int32 [B]): the kernel also writes the new keys and values into the caches,
  row b's at position write_positions[b] (of `layer`; none at a position past the caches' span or on
  an unassigned page), in place, and returns (output, cache k, cache v): a decode step then needs
  no scatter of its new tokens afterwards."""
  b, h, d = q_BxHxD.shape
  stacked = cache_k_BxKxSxD.shape if layer is not None else (1, *cache_k_BxKxSxD.shape)
  what = "[pages, K, page_size, D]" if page_table is not None else "[B, K, S, D]"
  if len(stacked) != 5:
    raise ValueError(f"decode_attention: cache k must be {what}, or [L, {what[1:]} with `layer`, got "
                     f"{cache_k_BxKxSxD.shape} (layer {'given' if layer is not None else 'not given'})")
  _, lead, kv, s, _ = stacked
  if stacked[0] > 256 * 256:
    raise ValueError(f"decode_attention: {stacked[0]} layers: the kernel indexes at most {256 * 256}")
  page_size = pages = 0
  if page_table is not None:
    if page_table.ndim != 2 or page_table.shape[0] != b:
      raise ValueError(f"decode_attention: page_table must be [B={b}, pages per row], got {page_table.shape}")
    pages, page_size, s = lead, s, page_table.shape[1] * s
    lead = b
  if lead != b or stacked[4] != d or cache_v_BxKxSxD.shape != cache_k_BxKxSxD.shape:
    raise ValueError(f"decode_attention: cache k and v must be {what} with B={b}, D={d} (after a leading layers "
                     f"axis with `layer`), got {cache_k_BxKxSxD.shape} and {cache_v_BxKxSxD.shape}")
  if k_new_BxKxD.shape != (b, kv, d) or v_new_BxKxD.shape != (b, kv, d):
    raise ValueError(f"decode_attention: new k and v must be [B={b}, K={kv}, D={d}], got "
                     f"{k_new_BxKxD.shape} and {v_new_BxKxD.shape}")
  if h % kv:
    raise ValueError(f"decode_attention: {h} query heads do not group over {kv} key/value heads")
  if cache_len_B.shape != (b,) or (write_positions is not None and write_positions.shape != (b,)):
    raise ValueError(f"decode_attention: cache_len and write_positions must be [B={b}], got {cache_len_B.shape} "
                     f"and {None if write_positions is None else write_positions.shape}")
  if page_size and not block_size(page_size):
    raise ValueError(f"decode_attention: page_size={page_size} must be a multiple of {MIN_ROWS} (a block of "
                     f"positions lies inside one page)")
  splits = default_splits(b, kv, s) if splits is None else splits
  if splits < 1 or splits & (splits - 1) or s % splits:
    raise ValueError(f"decode_attention: splits={splits} must be a power of two (a Triton block) dividing the "
                     f"cache's {s} positions")
  chunk = s // splits
  if block_s is None:
    block_s = min(block_size(chunk), block_size(page_size)) if page_size else block_size(chunk)
  if block_s < MIN_ROWS or block_s & (block_s - 1) or chunk % block_s or (page_size and page_size % block_s):
    raise ValueError(f"decode_attention: block_s={block_s} must be a power of two >= {MIN_ROWS} dividing "
                     f"a part of {chunk} positions (the cache's {s} over splits={splits})"
                     + (f" and a page of {page_size}" if page_size else ""))
  if d & (d - 1):
    raise ValueError(f"decode_attention: head dim {d} must be a power of two (a Triton block)")
  g = h // kv
  rows = max(MIN_ROWS, pl.next_power_of_2(g + 3))
  packed = _packed(q_BxHxD.reshape(b, kv, g, d), k_new_BxKxD, v_new_BxKxD, layer, rows, cache_k_BxKxSxD.dtype)
  whole = lambda shape: pl.BlockSpec(shape, lambda i, j, p: (0,) * len(shape))
  kernel = functools.partial(_kernel, groups=g, block_s=block_s, chunk=chunk, page_size=page_size, pages=pages,
                             scale=d ** -0.5)
  table = jnp.zeros((b, 1), jnp.int32) if page_table is None else page_table.astype(jnp.int32)
  params = lambda warps, stages: None if interpret else _compiler_params(warps, stages)
  # The parts' results are laid out [B, K, R, P(, D)], so that each query head's parts are contiguous
  # for the combine.
  part = lambda *tail: pl.BlockSpec((None, None, rows, None) + tail, lambda i, j, p: (i, j, 0, p) + (0,) * len(tail))
  lengths = cache_len_B.astype(jnp.int32)
  caches = (cache_k_BxKxSxD.reshape(stacked), cache_v_BxKxSxD.reshape(stacked))
  writes = write_positions is not None
  results = pl.pallas_call(
      kernel, grid=(b, kv, splits),
      out_shape=(jax.ShapeDtypeStruct((b, kv, rows, splits, d), F32), jax.ShapeDtypeStruct((b, kv, rows, splits), F32),
                 jax.ShapeDtypeStruct((b, kv, rows, splits), F32),
                 *([jax.ShapeDtypeStruct(stacked, cache_k_BxKxSxD.dtype)] * 2 if writes else [])),
      in_specs=[whole((b,)), whole((b,)), whole(table.shape), pl.BlockSpec((None, None, rows, d), lambda i, j, p: (i, j, 0, 0)),
                whole(stacked), whole(stacked)],
      out_specs=(part(d), part(), part(), *([whole(stacked)] * 2 if writes else [])),
      input_output_aliases={4: 3, 5: 4} if writes else {},
      interpret=interpret, compiler_params=params(num_warps, num_stages))(
          lengths, write_positions.astype(jnp.int32) if writes else lengths, table, packed, *caches)
  acc, m, total = results[:3]
  # The parts combined in a second launch (one program per query head), not in three XLA fusions.
  part = lambda *tail: pl.BlockSpec((None, None, None, splits) + tail, lambda i, j, r: (i, j, r, 0) + (0,) * len(tail))
  out = pl.pallas_call(
      _combine_kernel, grid=(b, kv, g), out_shape=jax.ShapeDtypeStruct((b, kv, g, d), q_BxHxD.dtype),
      in_specs=[part(d), part(), part()], out_specs=pl.BlockSpec((None, None, None, d), lambda i, j, r: (i, j, r, 0)),
      interpret=interpret, compiler_params=params(2, 1))(acc, m, total)
  if writes:
    return out.reshape(b, h, d), results[3].reshape(cache_k_BxKxSxD.shape), results[4].reshape(cache_v_BxKxSxD.shape)
  return out.reshape(b, h, d)
