"""One data-parallel replica of the serving engine (`serving.engine`): its scheduler, its model
runners (weights and KV caches: the served model's, a draft's, and on a prefill sub-mesh or in a
worker process the prompts' own), the transfers between them, its page manager, and the last token
of each of its slots. `dispatch` schedules one engine step and starts its work on the device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from configs import ModelConfig
from parallel.plan import ShardingPlan
from serving.disaggregation import KVTransfer
from serving.pages import PageManager
from serving.prefill_worker import connect
from serving.runner import ModelRunner, buckets
from serving.scheduler import Scheduler, Sequence
from serving.speculative import SpeculativeRunner

if TYPE_CHECKING:
  from serving.engine import Draft, Paging


class Replica:
  """One data-parallel replica: its scheduler, its model runner (weights and KV cache) and the
  last token of each of its slots."""

  def __init__(self, model_config: ModelConfig, params: Any, plan: ShardingPlan, slots: int, token_budget: int,
               max_len: int, decode_steps: int, draft: Draft | None = None, paging: Paging | None = None,
               prefill_plan: ShardingPlan | None = None, prefill_worker: str | None = None):
    """`prefill_plan`: prompts run on this (other) sub-mesh and move to `plan`'s for decoding;
    `prefill_worker`: they run in that worker process ("host:port", `serving.prefill_worker`)."""
    self.slots, self.decode_steps = slots, decode_steps
    self.buckets = buckets(token_budget)
    self.pages = None if paging is None else PageManager(paging.pages, paging.page_size, paging.prefix_caching)
    self.scheduler = Scheduler(slots, token_budget, max_chunk=self.buckets[-1], pages=self.pages)
    paged = {} if paging is None else {"page_size": paging.page_size, "pages": paging.pages}
    self.runner = ModelRunner(model_config, params, plan=plan, slots=slots, max_len=max_len, **paged)
    self.speculative = None
    if draft is not None:
      draft_runner = ModelRunner(draft.config, draft.params, plan=plan, slots=slots, max_len=max_len, **paged)
      self.speculative = SpeculativeRunner(self.runner, draft_runner, draft.tokens)
    self.prefill_runner, self.transfers = self.runner, []
    self.draft_prefill = self.speculative and self.speculative.draft  # where the draft reads prompts
    if prefill_plan is not None:
      # Paged: the prefill half's caches are paged too, with the same page tables.
      self.prefill_runner = ModelRunner(model_config, params, plan=prefill_plan, slots=slots, max_len=max_len, **paged)
      if draft is not None:  # the draft's prompts on the prefill half too, and its keys and values moved
        self.draft_prefill = ModelRunner(draft.config, draft.params, plan=prefill_plan, slots=slots, max_len=max_len,
                                         **paged)
    elif prefill_worker is not None:  # the worker's caches are paged as these are, with the same tables
      self.prefill_runner, remote_draft = connect(
          prefill_worker, slots=slots, max_len=max_len, vocab_size=model_config.vocab_size,
          **({} if paging is None else {"page_size": paging.page_size, "pages": paging.pages}),
          draft_vocab_size=None if draft is None else draft.config.vocab_size)
      if draft is not None:
        self.draft_prefill = remote_draft
    if self.prefill_runner is not self.runner:
      self.transfers.append(KVTransfer(self.prefill_runner, self.runner))
    if self.speculative and self.draft_prefill is not self.speculative.draft:
      self.transfers.append(KVTransfer(self.draft_prefill, self.speculative.draft))
    # Prompts done on the prefill sub-mesh, moved at the next step: (sequence, the pages it computed
    # or None for a contiguous cache).
    self._to_move: list[tuple[Sequence, list[int] | None]] = []
    self.last_token = np.zeros(slots, np.int32)

  @property
  def load(self) -> int:
    return len(self.scheduler.waiting) + len(self.scheduler.running)

  def dispatch(self) -> tuple:
    """Schedules a step and starts its work on the device: (plan, first tokens, decoded) where first
    tokens are (sequences whose prompt this step finished, their rows in the prefill's output, the
    prefill's (tokens, logprobs) device arrays), and decoded the decode loop's, or None."""
    for seq, pages in self._to_move:  # the last step's work is done: both caches are idle
      # Pages move even for a request that has ended: its prompt's blocks are in the prefix tree,
      # and a later prompt that shares them reads them on the decode half.
      if pages is not None or seq.request.id in self.scheduler.running:
        for transfer in self.transfers:
          transfer.move(seq.slot, seq.prompt_len, pages)
    self._to_move = []
    plan = self.scheduler.schedule()
    for seq in plan.admitted if self.pages is not None else ():
      for runner in self._paged_runners():
        runner.assign_pages(seq.slot, self.pages.pages_of(seq.request.id))
    # Decoding first: with a prefill worker the prompt chunks are a blocking call, which the
    # decode loop, already dispatched, runs beside.
    decoded = None
    if plan.decode:
      active = np.zeros(self.slots, bool)
      active[[s.slot for s in plan.decode]] = True
      # The cache holds prompt + output - 1 positions (the last token is written by its own step).
      longest = max(s.prompt_len + len(s.output) - 1 for s in plan.decode)
      sampling = self._sampling_rows(plan.decode, per_slot=True)
      if self.speculative is not None:
        remaining = np.zeros(self.slots, np.int32)  # the tokens each request may still emit
        for s in plan.decode:
          remaining[s.slot] = s.request.sampling.max_tokens - len(s.output)
        decoded = self.speculative.rounds(self.last_token, active, sampling, self.decode_steps, remaining_S=remaining)
      else:
        decoded = (*self.runner.decode(self.last_token, active, sampling, self.decode_steps,
                                       span=longest + self.decode_steps), None)
    firsts = ([], [], None)
    if plan.chunks:
      bucket = next(b for b in self.buckets if b >= max(n for _, _, n in plan.chunks))
      chunks = [(np.asarray(seq.request.prompt_ids[start:start + n]), seq.slot, start)
                for seq, start, n in plan.chunks]
      sampling = self._sampling_rows([seq for seq, _, _ in plan.chunks])
      out = self.prefill_runner.prefill(chunks, bucket, sampling)
      if self.speculative is not None:  # the draft reads the prompt too (its sampled token is not used)
        self.draft_prefill.prefill(chunks, bucket, sampling)
      done = []
      for i, (seq, _, n) in enumerate(plan.chunks):
        seq.prefilled += n
        if not seq.in_prompt:
          done.append(i)
          if self.pages is not None:  # its prompt's blocks can serve later requests
            self.pages.register(seq.request.id, seq.request.prompt_ids)
          if self.transfers:
            self._to_move.append((seq, self._computed_pages(seq)))
      firsts = ([plan.chunks[i][0] for i in done], done, out)
    return plan, firsts, decoded

  def _paged_runners(self) -> list:
    """Every runner of this replica whose cache is paged (each holds the same page tables), once each:
    `ModelRunner`s, and a prefill worker's `RemotePrefill`s."""
    runners = [self.runner, self.prefill_runner, self.speculative and self.speculative.draft, self.draft_prefill]
    return list({id(r): r for r in runners if r}.values())

  def _computed_pages(self, seq: Sequence) -> list[int] | None:
    """The pages of `seq`'s prompt that it computed itself (past the blocks it found in the prefix
    tree, which an earlier prompt computed and moved), or None for a contiguous cache."""
    if self.pages is None:
      return None
    size = self.pages.page_size
    return self.pages.pages_of(seq.request.id)[seq.cached // size:-(-seq.prompt_len // size)]

  def _sampling_rows(self, seqs: list[Sequence], per_slot: bool = False) -> tuple:
    """(temperature, top_k, top_p, seed, index of the next output token): one row per sequence,
    or with `per_slot` one row per slot (rows of other slots are greedy and ignored)."""
    rows = np.zeros((self.slots if per_slot else len(seqs), 5), np.float64)
    rows[:, 2] = 1.0
    for i, seq in enumerate(seqs):
      s = seq.request.sampling
      rows[seq.slot if per_slot else i] = (s.temperature, s.top_k, s.top_p, seq.seed, len(seq.output))
    return tuple(rows[:, j] for j in range(5))
