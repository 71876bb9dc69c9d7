"""The serving engine: requests in, tokens out, one scheduler step at a time.

    engine = Engine(config.model, params, plan=plan, slots=8, token_budget=256, max_len=1024, eos_id=tok.eos_id)
    engine.add(Request("a", prompt_ids, SamplingParams(max_tokens=64, temperature=0.0)))
    while engine.has_work():
      for event in engine.step(): ...

A step (`serving.scheduler`): requests waiting for a slot take free ones (the insert: a prefill
writes its keys and values straight into the request's slot, no separate copy); requests still in
their prompt get prompt chunks (prefill into their slot of the KV cache, all chunks of a step in one
forward pass, bucketed lengths) and requests past it get one decode token each (or `decode_steps`
tokens in one on-device loop), within a per-step token budget. The prompt's last chunk yields the
first output token. A request finishes on its EOS or a stop token id ("stop", the token included) or
at `max_tokens` ("length"); `abort` ends it at the next step ("abort"), and its slot is free for the
next request at once.

Parallelism comes from the plan, as in training: `tensor` splits every replica's heads and MLP
units (Megatron, the same rule tables), and `data` makes data-parallel replicas: each holds a full
copy of the (tensor-split) weights on its slice of the mesh, `slots / data` of the slots and its own
scheduler; a new request goes to the replica with the least outstanding work. Other mesh axes
(replica, stage, fsdp, seq, expert) must be 1 for serving.

Options beyond one engine, off by default: `paging` (a paged cache whose prompt prefixes are shared
through a prefix tree, `serving.pages`), `draft` (speculative decoding, `serving.speculative`:
`decode_steps` speculative rounds per step) and `disaggregate` (prompts and decoding on the two
halves of `data`, `serving.disaggregation`). All three combine: with disaggregation a draft's
prompts run on the prefill half too and its keys and values move with the served model's, and a
paged cache is paged on both halves with the same tables and moves page by page (the pages a prompt
computed). A prefill worker process (`prefill_worker`) takes both as well.

Single-threaded: call from one thread only (`serving.async_engine` runs it in its own thread).
A step dispatches the work of every replica (`serving.replica`), then waits for the device once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from configs import ModelConfig
from parallel.mesh import make_mesh
from parallel.plan import ShardingPlan
from serving.replica import Replica
from serving.scheduler import Sequence


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Per-request sampling (`serving.sampling`): temperature 0 is greedy; top_k 0 and top_p 1 are off;
  seed None draws one; stop_token_ids end the request (as does the engine's EOS)."""

  max_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int | None = None
  stop_token_ids: tuple[int, ...] = ()
  logprobs: bool = False


@dataclasses.dataclass(frozen=True)
class Request:
  id: str
  prompt_ids: tuple[int, ...]
  sampling: SamplingParams


@dataclasses.dataclass
class TokenEvent:
  """New tokens of one request in one step (with their log-probabilities if it asked for them)."""

  request_id: str
  token_ids: list[int]
  logprobs: list[float] | None
  finished: bool
  finish_reason: str | None  # "stop" | "length" | "abort"


def replica_plans(plan: ShardingPlan) -> list[ShardingPlan]:
  """One plan per index of the `data` axis: the same rule tables over that slice of the mesh."""
  mesh = plan.mesh
  others = {a: n for a, n in mesh.shape.items() if a not in ("data", "tensor") and n > 1}
  if others:
    raise ValueError(f"serving splits requests over `data` and weights over `tensor`; mesh axes {others} must be 1")
  data = mesh.axis_names.index("data")
  sizes = {"tensor": mesh.shape["tensor"]}
  return [dataclasses.replace(plan, mesh=make_mesh(sizes, np.take(mesh.devices, i, axis=data).reshape(-1).tolist()))
          for i in range(mesh.shape["data"])]


@dataclasses.dataclass(frozen=True)
class Paging:
  """A paged KV cache (`models.paged_cache`, `serving.pages`): `pages` pages of `page_size`
  positions per data-parallel replica, with prompt prefixes shared through a prefix tree when
  `prefix_caching` is on."""

  page_size: int
  pages: int
  prefix_caching: bool = True


@dataclasses.dataclass(frozen=True)
class Draft:
  """A draft model for speculative decoding: its config and parameters (same vocabulary as the
  target's), and how many tokens it proposes per round."""

  config: ModelConfig
  params: Any
  tokens: int = 4


def _check_servable(cfg: ModelConfig, max_len: int, what: str) -> None:
  if set(cfg.layer_pattern) != {"S"}:
    raise ValueError(f"{what}.layer_pattern={cfg.layer_pattern!r}: the engine's KV cache serves softmax "
                     "attention layers only")
  if cfg.n_experts:
    raise ValueError(f"{what}.n_experts={cfg.n_experts}: the engine serves dense models only")
  if max_len > cfg.max_seq_len:
    raise ValueError(f"max_len={max_len} exceeds {what}.max_seq_len={cfg.max_seq_len}")


class Engine:
  """Continuous batching over `slots` KV-cache slots of `max_len` positions each (`slots` in all,
  split evenly over the data-parallel replicas; `token_budget` per replica and step)."""

  def __init__(self, model_config: ModelConfig, params: Any, *, plan: ShardingPlan, slots: int, token_budget: int,
               max_len: int, eos_id: int | None, decode_steps: int = 1, draft: Draft | None = None,
               paging: Paging | None = None, disaggregate: bool = False, prefill_worker: str | None = None):
    """`draft`: decode speculatively with this draft model (`serving.speculative`). `paging`: a
    paged cache with prefix sharing (`serving.pages`) instead of a contiguous one per slot.
    `disaggregate`: prompts on the first half of the mesh's `data` axis (which must be 2), decoding
    on the second (`serving.disaggregation`); `prefill_worker` ("host:port"): prompts in that
    worker process (`serving.prefill_worker`), decoding here."""
    for name, value in (("slots", slots), ("token_budget", token_budget), ("max_len", max_len),
                        ("decode_steps", decode_steps)):
      if value < 1:
        raise ValueError(f"{name}={value} must be >= 1")
    _check_servable(model_config, max_len, "model")
    if draft is not None:
      _check_servable(draft.config, max_len, "the draft's model")
    if paging is not None:
      if paging.page_size < 1 or max_len % paging.page_size:
        raise ValueError(f"page_size={paging.page_size} must be >= 1 and divide max_len={max_len}")
      if paging.pages * paging.page_size < max_len:
        raise ValueError(f"pages={paging.pages} of {paging.page_size} positions cannot hold one request of "
                         f"max_len={max_len}")
    plans = replica_plans(plan)
    prefill_plan = None
    if disaggregate:
      if len(plans) != 2:
        raise ValueError(f"disaggregate: mesh.data={len(plans)}, must be 2 (prompts on the first half of the "
                         "devices, decoding on the second)")
      prefill_plan, plans = plans[0], plans[1:]
    if prefill_worker is not None:
      if disaggregate or len(plans) != 1:
        raise ValueError("prefill_worker: one engine replica (mesh.data=1), not combined with disaggregate")
    if slots % len(plans):
      raise ValueError(f"slots={slots} must divide over the {len(plans)} data-parallel replicas")
    self.model_config, self.max_len, self.slots = model_config, max_len, slots
    self.eos_id, self.decode_steps = eos_id, decode_steps
    self._replicas = [Replica(model_config, params, p, slots // len(plans), token_budget, max_len, decode_steps, draft,
                               paging, prefill_plan, prefill_worker) for p in plans]
    # Speculative decoding's counts (None without a draft): rounds of one slot, proposals, accepted ones.
    self.speculation = None if draft is None else {"rounds": 0, "proposed": 0, "accepted": 0}
    self._where: dict[str, Replica] = {}  # request id -> its replica
    self._aborts: list[str] = []
    self._seeds = np.random.default_rng()

  def warm_up_decode(self) -> int:
    """Compiles every decode program a request can need (each span, greedy and sampled; or the
    speculative round) on every replica, writing nothing; returns how many (`ModelRunner.warm_up`)."""
    return sum(r.speculative.warm_up(self.decode_steps) if r.speculative else r.runner.warm_up(self.decode_steps)
               for r in self._replicas)

  def warm_up_prefill(self) -> int:
    """Compiles the prefill of every (rows, chunk length) that fits the token budget, greedy and
    sampled, on every replica, the draft's too (it reads every prompt), writing nothing; returns
    how many (`ModelRunner.warm_up_prefill`)."""
    runners = [(r, runner) for r in self._replicas for runner in (r.prefill_runner, r.draft_prefill) if runner]
    return sum(runner.warm_up_prefill(r.buckets, r.scheduler.token_budget) for r, runner in runners)

  @property
  def num_waiting(self) -> int:
    return sum(len(r.scheduler.waiting) for r in self._replicas)

  @property
  def num_running(self) -> int:
    return sum(len(r.scheduler.running) for r in self._replicas)

  def has_work(self) -> bool:
    return bool(self._where or self._aborts)

  def add(self, request: Request) -> None:
    """Queues a request; ValueError (naming the field) if it cannot be served."""
    s, n = request.sampling, len(request.prompt_ids)
    if n == 0:
      raise ValueError("prompt_ids is empty")
    vocab = self.model_config.vocab_size
    if any(not 0 <= int(t) < vocab for t in request.prompt_ids):
      raise ValueError(f"prompt_ids: every id must be in [0, {vocab})")
    if s.max_tokens < 1:
      raise ValueError(f"max_tokens={s.max_tokens} must be >= 1")
    if n + s.max_tokens > self.max_len:
      raise ValueError(f"prompt of {n} tokens + max_tokens={s.max_tokens} exceeds the context of {self.max_len}")
    if s.temperature < 0:
      raise ValueError(f"temperature={s.temperature} must be >= 0")
    if s.top_k < 0:
      raise ValueError(f"top_k={s.top_k} must be >= 0")
    if not 0 < s.top_p <= 1:
      raise ValueError(f"top_p={s.top_p} must be in (0, 1]")
    if request.id in self._where:
      raise ValueError(f"request id {request.id!r} is already in the engine")
    seed = s.seed if s.seed is not None else int(self._seeds.integers(2**31))
    replica = min(self._replicas, key=lambda r: r.load)
    replica.scheduler.add(Sequence(request, seed=seed % 2**32))
    self._where[request.id] = replica

  def abort(self, request_id: str) -> None:
    """Ends the request at the next step; its slot is free from then on. Unknown ids are ignored."""
    self._aborts.append(request_id)

  def step(self) -> list[TokenEvent]:
    """One scheduler step: prompt chunks and decode tokens; the new tokens of every request that got some."""
    events = []
    for rid in self._aborts:
      replica = self._where.pop(rid, None)
      if replica is not None:
        replica.scheduler.remove(rid)
        events.append(TokenEvent(rid, [], None, True, "abort"))
    self._aborts.clear()
    started = [(r, *r.dispatch()) for r in self._replicas]
    started = jax.device_get(started)  # the step's one wait for the device
    for replica, plan, firsts, decoded in started:
      seqs, rows, out = firsts
      for seq, row in zip(seqs, rows):
        events.append(self._emit(replica, seq, [int(out[0][row])], [float(out[1][row])]))
      if decoded is not None:
        tokens, logprobs, counts = decoded
        for seq in plan.decode:
          if counts is None:
            events.append(self._emit(replica, seq, tokens[:, seq.slot].tolist(), logprobs[:, seq.slot].tolist()))
            continue
          # Speculative rounds [rounds, k + 1, slots]: each round's first counts[r] tokens, in order.
          emitted = counts[:, seq.slot]
          event = self._emit(replica, seq, [int(t) for r, c in enumerate(emitted) for t in tokens[r, :c, seq.slot]],
                             [float(x) for r, c in enumerate(emitted) for x in logprobs[r, :c, seq.slot]])
          events.append(event)
          # The rounds the request used (those after its end ran for nothing and are not counted).
          used = int(np.searchsorted(np.cumsum(emitted), len(event.token_ids))) + 1
          self._count_speculation(replica, [int(c) for c in emitted[:used]])
    return events

  @property
  def transfers(self) -> dict | None:
    """Disaggregation's prompt moves (None when colocated): how many, bytes, seconds."""
    moves = [t for r in self._replicas for t in r.transfers]
    if not moves:
      return None
    return {"count": sum(m.count for m in moves), "bytes": sum(m.bytes for m in moves),
            "seconds": sum(m.seconds for m in moves)}

  def reset_counters(self) -> None:
    """Zeroes the speculation, prefix-cache and transfer counts (after a warm-up, so they describe traffic)."""
    if self.speculation is not None:
      self.speculation.update(rounds=0, proposed=0, accepted=0)
    for r in self._replicas:
      if r.pages is not None:
        r.pages.queried_tokens = r.pages.matched_tokens = r.pages.evicted = 0
      for t in r.transfers:
        t.count = t.bytes = 0
        t.seconds = 0.0

  @property
  def prefix_cache(self) -> dict | None:
    """The paged cache's counts over every replica (None without paging): prompt tokens admitted and
    of those found in the prefix tree, and pages free, cached (evictable), evicted so far and in all."""
    managers = [r.pages for r in self._replicas if r.pages is not None]
    if not managers:
      return None
    return {"queried_tokens": sum(m.queried_tokens for m in managers),
            "matched_tokens": sum(m.matched_tokens for m in managers),
            "pages_free": sum(m.num_free for m in managers), "pages_cached": sum(m.num_cached for m in managers),
            "pages_evicted": sum(m.evicted for m in managers), "pages": sum(m.pages for m in managers)}

  def _count_speculation(self, replica: Replica, emitted: list[int]) -> None:
    k = replica.speculative.k
    self.speculation["rounds"] += len(emitted)
    self.speculation["proposed"] += k * len(emitted)
    self.speculation["accepted"] += sum(emitted) - len(emitted)

  def _emit(self, replica: Replica, seq: Sequence, tokens: list[int], logprobs: list[float]) -> TokenEvent:
    """Appends tokens up to the request's end; frees its slot when it ends."""
    s, reason, kept = seq.request.sampling, None, 0
    for token in tokens:
      seq.output.append(token)
      kept += 1
      if token == self.eos_id or token in s.stop_token_ids:
        reason = "stop"
      elif len(seq.output) >= s.max_tokens:
        reason = "length"
      if reason:
        break
    replica.last_token[seq.slot] = seq.output[-1]
    if reason:
      replica.scheduler.remove(seq.request.id)
      del self._where[seq.request.id]
    return TokenEvent(seq.request.id, tokens[:kept], logprobs[:kept] if s.logprobs else None, reason is not None,
                      reason)
