"""Pages of the paged KV cache on the host: which pages each request holds, and a prefix tree of
token blocks whose pages later requests reuse instead of computing them again (BatchLLM, Zheng et
al. 2024's prefix sharing; SGLang's radix cache, with one block of `page_size` tokens per edge).

A request is admitted with pages for its whole prompt and output (no preemption): the longest run
of its prompt's leading full blocks found in the tree is shared (reference-counted, never written
again), fresh pages hold the rest. Once its prompt is in the cache its full blocks enter the tree.
When its last user finishes, a page of the tree stays cached (evictable, least recently used leaf
first, when fresh pages run out); any other page is free at once.

At least one prompt token is always computed (the last one gives the first output token), so a
prompt matches at most (prompt length - 1) // page_size blocks.
"""

from __future__ import annotations

import dataclasses
import itertools


@dataclasses.dataclass(eq=False)
class _Node:
  block: tuple[int, ...]
  page: int
  parent: _Node | None
  children: dict = dataclasses.field(default_factory=dict)
  last_used: int = 0


class PageManager:
  """`pages` pages of `page_size` tokens; `prefix_caching` turns the prefix tree on."""

  def __init__(self, pages: int, page_size: int, prefix_caching: bool):
    if pages < 1 or page_size < 1:
      raise ValueError(f"pages={pages} and page_size={page_size} must be >= 1")
    self.pages, self.page_size, self.prefix_caching = pages, page_size, prefix_caching
    self._free = list(range(pages))
    self._refs = [0] * pages
    self._node_of: dict[int, _Node] = {}  # page -> its node in the tree
    self._root = _Node((), -1, None)
    self._held: dict[str, list[int]] = {}  # request id -> its pages, in position order
    self._clock = itertools.count(1)
    self.queried_tokens = 0  # prompt tokens of admitted requests
    self.matched_tokens = 0  # of those, found in the tree
    self.evicted = 0  # pages taken back from the tree

  @property
  def num_free(self) -> int:
    """Pages no request holds and the tree does not keep."""
    return len(self._free)

  @property
  def num_cached(self) -> int:
    """Pages the tree keeps that no request holds (evictable)."""
    return sum(1 for p in self._node_of if self._refs[p] == 0)

  def pages_of(self, request_id: str) -> list[int]:
    return self._held[request_id]

  def admit(self, request_id: str, prompt: tuple[int, ...], total_tokens: int) -> int | None:
    """Pages for a request of `total_tokens` positions (prompt and output): returns how many
    leading prompt tokens are already in the cache (shared pages), or None when the pages are
    not there (nothing is taken then)."""
    if request_id in self._held:
      raise ValueError(f"request id {request_id!r} already holds pages")
    matched = self._match(prompt) if self.prefix_caching else []
    need = -(-total_tokens // self.page_size) - len(matched)
    for node in matched:  # held before evicting, so the match itself is not evicted
      self._refs[node.page] += 1
    while len(self._free) < need and self._evict_one():
      pass
    if len(self._free) < need:
      for node in matched:
        self._refs[node.page] -= 1
      return None
    fresh = [self._free.pop(0) for _ in range(need)]
    for p in fresh:
      self._refs[p] += 1
    now = next(self._clock)
    for node in matched:
      node.last_used = now
    self._held[request_id] = [n.page for n in matched] + fresh
    self.queried_tokens += len(prompt)
    self.matched_tokens += len(matched) * self.page_size
    return len(matched) * self.page_size

  def register(self, request_id: str, prompt: tuple[int, ...]) -> None:
    """The request's prompt is in its pages: its full blocks enter the tree (a block already there
    keeps the tree's page; the request's copy stays its own)."""
    if not self.prefix_caching:
      return
    node, now = self._root, next(self._clock)
    for i, page in enumerate(self._held[request_id][:len(prompt) // self.page_size]):
      block = tuple(prompt[i * self.page_size:(i + 1) * self.page_size])
      child = node.children.get(block)
      if child is None:
        child = _Node(block, page, node)
        node.children[block] = child
        self._node_of[page] = child
      child.last_used = now
      node = child

  def release(self, request_id: str) -> None:
    """The request is done: its pages lose a user; those no one holds and the tree does not keep are free."""
    for p in self._held.pop(request_id, []):
      self._refs[p] -= 1
      if self._refs[p] == 0 and p not in self._node_of:
        self._free.append(p)

  def _match(self, prompt: tuple[int, ...]) -> list[_Node]:
    node, out = self._root, []
    for i in range((len(prompt) - 1) // self.page_size):
      node = node.children.get(tuple(prompt[i * self.page_size:(i + 1) * self.page_size]))
      if node is None:
        break
      out.append(node)
    return out

  def _evict_one(self) -> bool:
    """Frees the least recently used leaf of the tree that no request holds; False if there is none."""
    leaves = [n for p, n in self._node_of.items() if self._refs[p] == 0 and not n.children]
    if not leaves:
      return False
    node = min(leaves, key=lambda n: n.last_used)
    del node.parent.children[node.block]
    del self._node_of[node.page]
    self._free.append(node.page)
    self.evicted += 1
    return True
