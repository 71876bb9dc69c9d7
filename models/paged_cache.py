"""A paged KV cache: keys and values in fixed-size pages, and a page table per slot (vLLM's
PagedAttention layout), as a functional argument like `models.cache.KVCache` and with the same
interface, so the layer stack and the serving runner take either.

  k, v        [layers, pages, kv_heads, page_size, head_dim]  (the compute dtype)
  page_table  int32 [slots, max_len / page_size]: slot s's position p lives in page
              page_table[s, p // page_size] at offset p % page_size; entries past a slot's pages
              hold `pages` (out of range: reads clip to the last page and are masked by the
              lengths, writes are dropped)
  lengths     int32 [slots]

A page may sit in several slots' tables: prompts that share a prefix share its pages
(`serving.pages`), which hold whole blocks of page_size tokens and are never written again.

Attention reads a row's pages gathered into the contiguous [kv_heads, positions, head_dim] view
that `models.cache.attend_with_cache` takes (XLA), and `window(span)` gathers the first span
positions once for a decode loop, as the contiguous cache's window copies them. With the decode
kernel (`model.decode_attention='pallas'`, one device, pages of a multiple of 16 positions) a
decode step reads the pages in place instead (`pages_in_place`; vLLM's PagedAttention): nothing is
gathered.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.cache import KVCache, replicated

PAGE_AXES = ("layers", None, "kv_heads", None, "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
  k: jax.Array
  v: jax.Array
  page_table: jax.Array
  lengths: jax.Array

  @classmethod
  def zeros(cls, n_layers: int, slots: int, max_len: int, kv_heads: int, head_dim: int, dtype: Any, *,
            page_size: int, pages: int, sharding: Any = None) -> PagedKVCache:
    """An empty cache of `pages` pages, every table entry unassigned; `sharding` lays out k and v."""
    if page_size < 1 or max_len % page_size:
      raise ValueError(f"page_size={page_size} must be >= 1 and divide max_len={max_len}")
    if pages < 1:
      raise ValueError(f"pages={pages} must be >= 1")
    shape = (n_layers, pages, kv_heads, page_size, head_dim)
    make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    table = replicated(np.full((slots, max_len // page_size), pages, np.int32), sharding)
    return cls(make(), make(), table, replicated(np.zeros((slots,), np.int32), sharding))

  @property
  def page_size(self) -> int:
    return self.k.shape[3]

  @property
  def pages(self) -> int:
    return self.k.shape[1]

  @property
  def max_len(self) -> int:
    return self.page_table.shape[1] * self.page_size

  @property
  def slots(self) -> int:
    return self.page_table.shape[0]

  def with_pages(self, slot: int, pages: list[int]) -> PagedKVCache:
    """Slot `slot`'s table set to `pages` (in position order), the rest unassigned; the table keeps
    its layout (an update outside a compiled call would change how its sharding is spelled, and
    the next call would compile again)."""
    row = np.full((self.page_table.shape[1],), self.pages, np.int32)
    row[:len(pages)] = pages
    table = jax.device_put(self.page_table.at[slot].set(row), self.page_table.sharding)
    return dataclasses.replace(self, page_table=table)

  def _gather(self, table_BxP: jax.Array) -> dict:
    """The contiguous view [layers, B, K, P * page_size, D] of each row's pages."""
    def view(a):
      g = jnp.take(a, table_BxP, axis=1, mode="clip")  # [L, B, P, K, page, D]
      l, b, p, k, s, d = g.shape
      return g.transpose(0, 1, 3, 2, 4, 5).reshape(l, b, k, p * s, d)
    return {"k": view(self.k), "v": view(self.v)}

  def rows(self, slot_ids_B: jax.Array | None) -> dict:
    """As `KVCache.rows`: {"k", "v": [layers, B, K, max_len, D]} of the rows' slots (gathered)."""
    table = self.page_table if slot_ids_B is None else jnp.take(self.page_table, slot_ids_B, axis=0, mode="clip")
    return self._gather(table)

  def pages_in_place(self) -> dict:
    """Every slot's view for the decode kernel, which reads the pages in place
    (`models.attention.reads_pages_in_place`): {"k", "v": [layers, pages, K, page_size, D],
    "page_table": [slots, P]}."""
    return {"k": self.k, "v": self.v, "page_table": self.page_table}

  def window(self, span: int) -> KVCache:
    """A contiguous cache of every slot's positions [0, span) (`KVCache.window`)."""
    if not 0 < span <= self.max_len:
      raise ValueError(f"span={span} must be in [1, max_len={self.max_len}]")
    n = -(-span // self.page_size)
    view = self._gather(self.page_table[:, :n])
    return KVCache(view["k"][:, :, :, :span], view["v"][:, :, :, :span], self.lengths)

  def write(self, new_kv: dict, slot_ids_B: jax.Array | None, positions_BxT: jax.Array,
            new_lengths_B: jax.Array) -> PagedKVCache:
    """As `KVCache.write`: the new tokens' keys and values ([layers, B, T, K, D]) into their slots'
    pages; positions >= max_len, unassigned pages and padding rows (slot id >= slots) write nothing."""
    slots = jnp.arange(self.slots) if slot_ids_B is None else slot_ids_B
    table = jnp.take(self.page_table, slots, axis=0, mode="fill", fill_value=self.pages)  # [B, P]
    in_range = positions_BxT < self.max_len
    page = jnp.take_along_axis(table, jnp.where(in_range, positions_BxT // self.page_size, 0), axis=1)
    page = jnp.where(in_range, page, self.pages)  # out of range: dropped
    offset = positions_BxT % self.page_size
    # Indexed view [B, T, layers, K, D] (advanced indices apart, NumPy's rule), as in KVCache.write.
    idx = (slice(None), page, slice(None), offset)
    to_view = lambda a: a.transpose(1, 2, 0, 3, 4).astype(self.k.dtype)
    k = self.k.at[idx].set(to_view(new_kv["k"]), mode="drop")
    v = self.v.at[idx].set(to_view(new_kv["v"]), mode="drop")
    lengths = self.lengths.at[slots].set(new_lengths_B.astype(jnp.int32), mode="drop")
    return dataclasses.replace(self, k=k, v=v, lengths=lengths)
