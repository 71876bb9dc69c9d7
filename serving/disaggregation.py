"""Prefill/decode disaggregation: prompts are computed on one sub-mesh and decoded on another, and
a request's keys and values move between the two caches when its prompt is done (DistServe, Zhong
et al. 2024; Splitwise, Patel et al. 2024). The two phases then stop competing for the same
devices: a step's prompt chunks and its decode tokens run at the same time, each on its own half.

`KVTransfer.move` copies one slot's first `length` positions (rounded up to a power of two, so the
number of compilations stays logarithmic in max_len) from the prefill runner's cache to the same
slot of the decode runner's cache: a slice on the prefill devices, a `jax.device_put` onto the
decode devices' layout of it (the cross-sub-mesh copy), and an in-place update of the decode
cache (donated). Both runners hold caches of the same slots and max_len. Across processes the
prefill side is a worker (`serving.prefill_worker`) and the slice comes over TCP.

Paged caches (`models.paged_cache`) are paged on both sides with the same page tables (the engine
assigns a request's pages to every runner), and a move copies pages instead: the pages a prompt
computed itself (the blocks it found in the prefix tree were computed, and moved, by an earlier
prompt), their count rounded up to a power of two with out-of-range padding that reads zeros and
writes nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.cache import CACHE_AXES
from models.paged_cache import PAGE_AXES, PagedKVCache
from serving.runner import ModelRunner, span_bucket

ROW_AXES = CACHE_AXES[:1] + CACHE_AXES[2:]  # one slot's [layers, kv_heads, positions, head_dim]


class KVTransfer:
  """Moves prompts' keys and values from `prefill`'s cache to `decode`'s; counts bytes and time.
  `prefill` is a `ModelRunner` on other devices of this process, or a
  `serving.prefill_worker.RemotePrefill` (another process: its `take` and `take_pages` send the
  arrays over TCP)."""

  def __init__(self, prefill: Any, decode: ModelRunner):
    if (prefill.slots, prefill.max_len) != (decode.slots, decode.max_len):
      raise ValueError(f"prefill and decode caches differ: slots and max_len {(prefill.slots, prefill.max_len)} "
                       f"against {(decode.slots, decode.max_len)}")
    self.local = isinstance(prefill, ModelRunner)
    paged = isinstance(prefill.cache, PagedKVCache) if self.local else prefill.pages > 0
    if paged != isinstance(decode.cache, PagedKVCache):
      raise ValueError("prefill and decode caches must both be paged or both contiguous")
    if self.local and set(prefill.plan.mesh.devices.flat) & set(decode.plan.mesh.devices.flat):
      raise ValueError("prefill and decode sub-meshes must not share devices")
    self.prefill, self.decode = prefill, decode
    self.count = self.bytes = 0
    self.seconds = 0.0
    self._put = jax.jit(_put, donate_argnums=(0,))
    self._put_pages = jax.jit(_put_pages, donate_argnums=(0,))

  def move(self, slot: int, length: int, pages: list[int] | None = None) -> None:
    """Slot `slot`'s positions [0, length) and its length, prefill cache -> decode cache (paged: the
    pages `pages` of the slot's table); waits for the copy (the decode cache is idle between engine
    steps), so `seconds` is the transfer's time."""
    start = time.perf_counter()
    moved = self._move_positions(slot, length) if pages is None else self._move_pages(slot, length, pages)
    jax.block_until_ready(self.decode.cache.k)
    self.seconds += time.perf_counter() - start
    self.count += 1
    self.bytes += moved

  def _move_positions(self, slot: int, length: int) -> int:
    """The contiguous move; returns the bytes moved."""
    span = span_bucket(length, self.prefill.max_len)
    if self.local:
      k, v = take_slot(self.prefill.cache, slot, span=span)
    else:
      k, v = self.prefill.take(slot, span)
    dst = self.decode.plan
    k, v = jax.device_put((k, v), dst.sharding(ROW_AXES, dst.activations, k.shape))
    self.decode.cache = self._put(self.decode.cache, k, v, jnp.int32(slot), jnp.int32(length))
    return 2 * k.size * k.dtype.itemsize

  def _move_pages(self, slot: int, length: int, pages: list[int]) -> int:
    """The paged move; returns the bytes of the real pages moved (not the padding)."""
    index = np.full(1 << max(len(pages) - 1, 0).bit_length(), self.decode.cache.pages, np.int32)  # pad: out of range
    index[:len(pages)] = pages
    k, v = take_pages(self.prefill.cache, jnp.asarray(index)) if self.local else self.prefill.take_pages(index)
    dst = self.decode.plan
    k, v = jax.device_put((k, v), dst.sharding(PAGE_AXES, dst.activations, k.shape))
    self.decode.cache = self._put_pages(self.decode.cache, k, v, jnp.asarray(index), jnp.int32(slot),
                                        jnp.int32(length))
    return 2 * len(pages) * (k.size // len(index)) * k.dtype.itemsize


@jax.jit
def take_pages(cache, index_N):
  """Pages `index` of a paged cache ([layers, N, kv heads, page size, head dim] each; zeros where out of range)."""
  take = lambda a: jnp.take(a, index_N, axis=1, mode="fill", fill_value=0)
  return take(cache.k), take(cache.v)


def _put_pages(cache, k, v, index_N, slot, length):
  return dataclasses.replace(cache, k=cache.k.at[:, index_N].set(k, mode="drop"),
                             v=cache.v.at[:, index_N].set(v, mode="drop"), lengths=cache.lengths.at[slot].set(length))


@functools.partial(jax.jit, static_argnames=("span",))
def take_slot(cache, slot, *, span: int):
  """Slot `slot`'s keys and values over positions [0, span): [layers, kv heads, span, head dim] each."""
  return cache.k[:, slot, :, :span], cache.v[:, slot, :, :span]


def _put(cache, k_LxKxSxD, v_LxKxSxD, slot, length):
  at = (0, slot, 0, 0, 0)
  return type(cache)(jax.lax.dynamic_update_slice(cache.k, k_LxKxSxD[:, None], at),
                     jax.lax.dynamic_update_slice(cache.v, v_LxKxSxD[:, None], at),
                     cache.lengths.at[slot].set(length))
