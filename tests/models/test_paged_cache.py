"""The paged KV cache against a contiguous cache kept in numpy: the same writes, read back through
the page tables (shared pages included); dropped writes; the window."""

from __future__ import annotations

import numpy as np
import pytest

import jax.numpy as jnp

from models.paged_cache import PagedKVCache

L, K, D, PAGE, MAX_LEN = 2, 2, 4, 4, 16


def _new_kv(rng, b, t):
  return {n: jnp.asarray(rng.standard_normal((L, b, t, K, D)).astype(np.float32)) for n in ("k", "v")}


def test_writes_read_back_through_page_tables():
  rng = np.random.default_rng(0)
  cache = PagedKVCache.zeros(L, 3, MAX_LEN, K, D, jnp.float32, page_size=PAGE, pages=8)
  tables = {0: [5, 2, 7], 1: [5, 1], 2: [0, 3, 4, 6]}  # slot 1 shares page 5 (its first block) with slot 0
  for slot, pages in tables.items():
    cache = cache.with_pages(slot, pages)
  want = {n: np.zeros((L, 3, K, MAX_LEN, D), np.float32) for n in ("k", "v")}
  # Slot 0 writes positions 0..9, slot 2 positions 0..13 (two rows of one chunk, the rest padding).
  positions = np.array([np.r_[0:10, [MAX_LEN] * 4], np.r_[0:14]])
  new = _new_kv(rng, 2, 14)
  cache = cache.write(new, jnp.asarray([0, 2]), jnp.asarray(positions), jnp.asarray([10, 14]))
  for row, slot in enumerate((0, 2)):
    for t, pos in enumerate(positions[row]):
      if pos < MAX_LEN:
        for n in ("k", "v"):
          want[n][:, slot, :, pos] = np.asarray(new[n])[:, row, t]
  # Slot 1 shares slot 0's first page: its positions 0..3 are slot 0's; it writes 4..6 itself, and a
  # padding row (slot id 3 >= slots) writes nothing.
  new1 = _new_kv(rng, 2, 3)
  cache = cache.write(new1, jnp.asarray([1, 3]), jnp.asarray([[4, 5, 6], [0, 1, 2]]), jnp.asarray([7, 9]))
  for n in ("k", "v"):
    want[n][:, 1, :, :4] = want[n][:, 0, :, :4]
    want[n][:, 1, :, 4:7] = np.asarray(new1[n])[:, 0].transpose(0, 2, 1, 3)
  rows = cache.rows(None)
  for slot, pages in tables.items():
    n_pos = len(pages) * PAGE
    for n in ("k", "v"):
      np.testing.assert_array_equal(np.asarray(rows[n])[:, slot, :, :n_pos], want[n][:, slot, :, :n_pos])
  assert np.asarray(cache.lengths).tolist() == [10, 7, 14]
  picked = cache.rows(jnp.asarray([2, 0]))
  np.testing.assert_array_equal(np.asarray(picked["k"])[:, 0], np.asarray(rows["k"])[:, 2])
  window = cache.window(8)
  assert window.k.shape == (L, 3, K, 8, D) and window.max_len == 8
  np.testing.assert_array_equal(np.asarray(window.v)[:, 2], want["v"][:, 2, :, :8])


def test_bad_pages_are_refused():
  with pytest.raises(ValueError, match="page_size=5 must be >= 1 and divide max_len=16"):
    PagedKVCache.zeros(L, 2, MAX_LEN, K, D, jnp.float32, page_size=5, pages=4)
  with pytest.raises(ValueError, match="pages=0"):
    PagedKVCache.zeros(L, 2, MAX_LEN, K, D, jnp.float32, page_size=4, pages=0)
