"""The serving engine: requests in, tokens out, one scheduler step at a time.

    engine = Engine(config.model, params, plan=plan, slots=8, token_budget=256, max_len=1024, eos_id=tok.eos_id)
    engine.add(Request("a", prompt_ids, SamplingParams(max_tokens=64, temperature=0.0)))
    while engine.has_work():
      for event in engine.step(): ...

A step (`serving.scheduler`): requests waiting for a slot take free ones; requests still in their
prompt get prompt chunks (prefill into their slot of the KV cache, bucketed lengths) and requests
past it get one decode token each (or `decode_steps` tokens in one on-device loop), within a
per-step token budget. The prompt's last chunk yields the first output token. A request finishes on
its EOS or a stop token id ("stop", the token included) or at `max_tokens` ("length"); `abort`
ends it at the next step ("abort"), and its slot is free for the next request at once.

Single-threaded: call from one thread only (`serving.async_engine` runs it in its own thread).
One host transfer per step, after every dispatch of the step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from configs import ModelConfig
from parallel.plan import ShardingPlan
from serving.runner import ModelRunner, buckets
from serving.scheduler import Scheduler, Sequence


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


class Engine:
  """Continuous batching over `slots` KV-cache slots of `max_len` positions each."""

  def __init__(self, model_config: ModelConfig, params: Any, *, plan: ShardingPlan, slots: int, token_budget: int,
               max_len: int, eos_id: int | None, decode_steps: int = 1):
    for name, value in (("slots", slots), ("token_budget", token_budget), ("max_len", max_len),
                        ("decode_steps", decode_steps)):
      if value < 1:
        raise ValueError(f"{name}={value} must be >= 1")
    if max_len > model_config.max_seq_len:
      raise ValueError(f"max_len={max_len} exceeds model.max_seq_len={model_config.max_seq_len}")
    self.model_config, self.max_len, self.slots = model_config, max_len, slots
    self.eos_id, self.decode_steps = eos_id, decode_steps
    self._buckets = buckets(token_budget)
    self._scheduler = Scheduler(slots, token_budget, max_chunk=self._buckets[-1])
    self._runner = ModelRunner(model_config, params, plan=plan, slots=slots, max_len=max_len)
    self._last_token = np.zeros(slots, np.int32)
    self._aborts: list[str] = []
    self._seeds = np.random.default_rng()

  @property
  def num_waiting(self) -> int:
    return len(self._scheduler.waiting)

  @property
  def num_running(self) -> int:
    return len(self._scheduler.running)

  def has_work(self) -> bool:
    return bool(self._scheduler.waiting or self._scheduler.running or self._aborts)

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
    if request.id in self._scheduler.running or any(q.request.id == request.id for q in self._scheduler.waiting):
      raise ValueError(f"request id {request.id!r} is already in the engine")
    seed = s.seed if s.seed is not None else int(self._seeds.integers(2**31))
    self._scheduler.add(Sequence(request, seed=seed % 2**32))

  def abort(self, request_id: str) -> None:
    """Ends the request at the next step; its slot is free from then on. Unknown ids are ignored."""
    self._aborts.append(request_id)

  def step(self) -> list[TokenEvent]:
    """One scheduler step: prompt chunks and decode tokens; the new tokens of every request that got some."""
    events = []
    for rid in self._aborts:
      if self._scheduler.remove(rid) is not None:
        events.append(TokenEvent(rid, [], None, True, "abort"))
    self._aborts.clear()
    plan = self._scheduler.schedule()

    firsts = []  # (sequence, token, logprob) of prompts that finished this step
    for seq, start, n in plan.chunks:
      bucket = next(b for b in self._buckets if b >= n)
      out = self._runner.prefill(np.asarray(seq.request.prompt_ids[start:start + n]), bucket, seq.slot, start,
                                 self._sampling_rows([seq]))
      seq.prefilled += n
      if not seq.in_prompt:
        firsts.append((seq, *out))
    decoded = None
    if plan.decode:
      active = np.zeros(self.slots, bool)
      active[[s.slot for s in plan.decode]] = True
      decoded = self._runner.decode(self._last_token, active, self._sampling_rows(plan.decode, per_slot=True),
                                    self.decode_steps)
    firsts, decoded = jax.device_get((firsts, decoded))  # the step's one wait for the device

    for seq, token, logprob in firsts:
      events.append(self._emit(seq, [int(token[0])], [float(logprob[0])]))
    if decoded is not None:
      tokens, logprobs = decoded
      for seq in plan.decode:
        events.append(self._emit(seq, tokens[:, seq.slot].tolist(), logprobs[:, seq.slot].tolist()))
    return events

  def _sampling_rows(self, seqs: list[Sequence], per_slot: bool = False) -> tuple:
    """(temperature, top_k, top_p, seed, index of the next output token): one row per sequence,
    or with `per_slot` one row per slot (rows of other slots are greedy and ignored)."""
    rows = np.zeros((self.slots if per_slot else len(seqs), 5), np.float64)
    rows[:, 2] = 1.0
    for i, seq in enumerate(seqs):
      s = seq.request.sampling
      rows[seq.slot if per_slot else i] = (s.temperature, s.top_k, s.top_p, seq.seed, len(seq.output))
    return tuple(rows[:, j] for j in range(5))

  def _emit(self, seq: Sequence, tokens: list[int], logprobs: list[float]) -> TokenEvent:
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
    self._last_token[seq.slot] = seq.output[-1]
    if reason:
      self._scheduler.remove(seq.request.id)
    return TokenEvent(seq.request.id, tokens[:kept], logprobs[:kept] if s.logprobs else None, reason is not None,
                      reason)
