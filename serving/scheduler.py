"""Continuous batching with chunked prefill: which requests run in a step, and how many prompt
tokens each gets (DeepSpeed-FastGen's Dynamic SplitFuse, Holmes et al. 2024; Sarathi-Serve).

Every step, requests join and leave: a waiting request takes a free slot as soon as one exists
(first come, first served), and a finished one frees its slot at once. A step's work is one
decode token for every request past its prompt, plus prompt chunks for the requests still in
their prompt, up to `token_budget` tokens in all: a long prompt is split over several steps and
short ones are taken whole, so every step does about the same amount of work and running
requests keep producing tokens while a long prompt is read (no prefill stall).

Host-side bookkeeping only; `serving.engine.Engine` runs the plan on the device: all prompt
chunks of a step in one forward pass (a row each) and all decode tokens in one decode loop,
dispatched together and waited for once per step (FastGen fuses the two into one forward pass;
here they share the step, not the pass).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any


@dataclasses.dataclass(eq=False)
class Sequence:
  """A request in the engine: its slot, how much of its prompt is in the cache, what it produced."""

  request: Any  # serving.engine.Request
  seed: int
  slot: int = -1
  prefilled: int = 0
  cached: int = 0  # prompt tokens whose pages came from the prefix tree
  output: list[int] = dataclasses.field(default_factory=list)

  @property
  def prompt_len(self) -> int:
    return len(self.request.prompt_ids)

  @property
  def in_prompt(self) -> bool:
    return self.prefilled < self.prompt_len


@dataclasses.dataclass
class StepPlan:
  chunks: list[tuple[Sequence, int, int]]  # (sequence, first prompt position, number of tokens)
  decode: list[Sequence]  # one token each
  admitted: list[Sequence] = dataclasses.field(default_factory=list)  # took a slot (and pages) this step


class Scheduler:
  """Slots, the waiting queue and the token budget."""

  def __init__(self, slots: int, token_budget: int, max_chunk: int, pages: Any = None):
    """`pages`: a `serving.pages.PageManager` (paged cache): a request also needs its pages to be
    admitted, and starts its prompt after the prefix the cache already holds."""
    if token_budget < slots:
      raise ValueError(f"token_budget={token_budget} must be >= slots={slots}: a step decodes one token "
                       "for every running request and must leave room for a prompt chunk")
    self.slots, self.token_budget, self.max_chunk = slots, token_budget, max_chunk
    self.waiting: collections.deque[Sequence] = collections.deque()
    self.running: dict[str, Sequence] = {}  # in order of admission
    self._free = list(range(slots))
    self.pages = pages

  def add(self, seq: Sequence) -> None:
    self.waiting.append(seq)

  def remove(self, request_id: str) -> Sequence | None:
    """Takes a request out (abort or finish), freeing its slot; None if it is not here."""
    seq = self.running.pop(request_id, None)
    if seq is not None:
      if self.pages is not None:
        self.pages.release(request_id)
      self._free.append(seq.slot)
      self._free.sort()
      return seq
    for seq in self.waiting:
      if seq.request.id == request_id:
        self.waiting.remove(seq)
        return seq
    return None

  def schedule(self) -> StepPlan:
    """Admits waiting requests into free slots, then splits the budget: decode tokens first, then
    prompt chunks in order of admission. With pages, the head of the queue waits (and the rest
    behind it, first come first served) until its pages are there."""
    admitted = []
    while self.waiting and self._free:
      seq = self.waiting[0]
      if self.pages is not None:
        cached = self.pages.admit(seq.request.id, seq.request.prompt_ids,
                                  seq.prompt_len + seq.request.sampling.max_tokens)
        if cached is None:
          break
        seq.prefilled = seq.cached = cached
      self.waiting.popleft()
      seq.slot = self._free.pop(0)
      self.running[seq.request.id] = seq
      admitted.append(seq)
    decode = [s for s in self.running.values() if not s.in_prompt]
    budget = self.token_budget - len(decode)
    chunks = []
    for seq in self.running.values():
      if budget <= 0:
        break
      if seq.in_prompt:
        n = min(seq.prompt_len - seq.prefilled, budget, self.max_chunk)
        chunks.append((seq, seq.prefilled, n))
        budget -= n
    return StepPlan(chunks, decode, admitted)
