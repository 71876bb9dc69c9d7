"""The host side of the paged cache (serving/pages.py): sharing, reference counts, freeing, LRU eviction."""

from __future__ import annotations

import pytest

from serving.pages import PageManager

SYSTEM = tuple(range(100, 112))  # three blocks of 4


def test_a_shared_prefix_is_matched_after_its_prompt_is_registered():
  m = PageManager(pages=12, page_size=4, prefix_caching=True)
  a = SYSTEM + (1, 2, 3)
  assert m.admit("a", a, total_tokens=len(a) + 5) == 0  # nothing cached yet: 15 + 5 tokens, 5 pages
  assert m.num_free == 7
  assert m.admit("b", SYSTEM + (9,), total_tokens=17) == 0  # a's prompt is not registered yet
  m.release("b")
  m.register("a", a)
  assert m.admit("b", SYSTEM + (9,), total_tokens=17) == 12  # three shared blocks, two fresh pages
  assert m.pages_of("b")[:3] == m.pages_of("a")[:3] and set(m.pages_of("b")[3:]).isdisjoint(m.pages_of("a"))
  # A prompt that is exactly the cached blocks still computes its last token: two blocks match.
  assert m.admit("c", SYSTEM, total_tokens=14) == 8
  assert (m.queried_tokens, m.matched_tokens) == (15 + 13 + 13 + 12, 12 + 8)  # b was admitted twice


def test_pages_are_freed_when_the_last_user_finishes():
  m = PageManager(pages=10, page_size=4, prefix_caching=True)
  a = SYSTEM + (1,)
  m.admit("a", a, total_tokens=20)
  m.register("a", a)
  m.admit("b", SYSTEM + (2,), total_tokens=20)
  m.release("a")
  assert m.num_free == 10 - 5 - 2 + 2 and m.num_cached == 0  # a's own two pages are free; the shared three are b's
  m.release("b")
  assert m.num_free == 7 and m.num_cached == 3  # the tree keeps the system prompt's blocks, now evictable
  off = PageManager(pages=10, page_size=4, prefix_caching=False)
  off.admit("a", a, total_tokens=20)
  off.register("a", a)
  assert off.admit("b", SYSTEM + (2,), total_tokens=20) == 0
  off.release("a")
  off.release("b")
  assert off.num_free == 10


def test_eviction_takes_least_recently_used_leaves_and_never_held_pages():
  m = PageManager(pages=6, page_size=4, prefix_caching=True)
  x, y = (1,) * 8 + (5,), (2,) * 8 + (6,)
  for rid, prompt in (("x", x), ("y", y)):
    assert m.admit(rid, prompt, total_tokens=12) == 0
    m.register(rid, prompt)
    m.release(rid)
  assert m.num_cached == 4 and m.num_free == 2  # two blocks of each prompt cached
  assert m.admit("x2", x, total_tokens=12) == 8  # x's blocks used again: y's are now the older
  m.release("x2")
  assert m.admit("z", (3,) * 9, total_tokens=12) == 0  # 3 pages: the 2 free and y's leaf, the LRU one
  assert m.num_cached == 3 and m.num_free == 0
  assert m.admit("y2", y, total_tokens=12) == 4  # y's first block is still there; x's two are evicted for it
  assert m.num_cached == 0
  assert m.admit("w", (4,) * 5, total_tokens=8) is None  # every page is held: refused, nothing taken
  m.release("z")
  assert m.admit("w", (4,) * 5, total_tokens=8) == 0


def test_bad_arguments():
  with pytest.raises(ValueError, match="page_size=0"):
    PageManager(pages=4, page_size=0, prefix_caching=True)
  m = PageManager(pages=4, page_size=4, prefix_caching=True)
  m.admit("a", (1, 2), total_tokens=4)
  with pytest.raises(ValueError, match="'a' already holds pages"):
    m.admit("a", (1, 2), total_tokens=4)
