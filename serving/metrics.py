"""Serving metrics in the Prometheus text exposition format (version 0.0.4), written by hand.

What /metrics shows (names as vLLM's, with a `shardlab_` prefix):
  shardlab_num_requests_waiting            gauge: accepted, not yet holding a decode slot
  shardlab_num_requests_running            gauge: holding a decode slot
  shardlab_generation_tokens_per_second    gauge: output tokens over the last `window_s` seconds
  shardlab_prompt_tokens_total, shardlab_generation_tokens_total                counters
  shardlab_request_success_total{finished_reason="stop"|"length"|"abort"}        counter
  shardlab_request_rejected_total{reason="queue_full"|"draining"|"invalid"}      counter
  shardlab_time_to_first_token_seconds     histogram: arrival -> first token
  shardlab_time_per_output_token_seconds   histogram: (end - first token) / (tokens - 1), per request
  shardlab_e2e_request_latency_seconds     histogram: arrival -> last token
With a paged cache (prefix sharing):
  shardlab_prefix_cache_queries_total, shardlab_prefix_cache_hits_total  counters: prompt tokens
      admitted, and of those found in the prefix tree (not computed again)
  shardlab_prefix_cache_hit_rate           gauge: hits / queries so far
  shardlab_kv_cache_pages{state="free"|"cached"|"used"}, shardlab_kv_cache_pages_evicted_total
With prefill/decode disaggregation:
  shardlab_kv_transfers_total, shardlab_kv_transfer_bytes_total, shardlab_kv_transfer_seconds_total  counters
With a draft model (speculative decoding):
  shardlab_spec_decode_num_draft_tokens_total, shardlab_spec_decode_num_accepted_tokens_total  counters
  shardlab_spec_decode_draft_acceptance_rate   gauge: accepted / proposed so far
  shardlab_spec_decode_tokens_per_round        gauge: tokens a slot gets per round (1 + accepted)

Every method is thread-safe: the engine thread and the event loop both record.
"""

from __future__ import annotations

import bisect
import collections
import threading
import time

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 2.5, 5.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
               50.0, 60.0, 120.0, 240.0)


class Histogram:
  """Cumulative-bucket histogram as Prometheus exposes it (`le` upper bounds, +Inf last)."""

  def __init__(self, buckets: tuple[float, ...]):
    self.bounds = tuple(sorted(buckets))
    self.counts = [0] * (len(self.bounds) + 1)  # per bucket, not cumulative; last is +Inf
    self.sum = 0.0
    self.count = 0

  def observe(self, value: float) -> None:
    self.counts[bisect.bisect_left(self.bounds, value)] += 1
    self.sum += value
    self.count += 1

  def lines(self, name: str) -> list[str]:
    out, running = [], 0
    for bound, c in zip(self.bounds + (float("inf"),), self.counts):
      running += c
      le = "+Inf" if bound == float("inf") else repr(float(bound))
      out.append(f'{name}_bucket{{le="{le}"}} {running}')
    out.append(f"{name}_sum {self.sum!r}")
    out.append(f"{name}_count {self.count}")
    return out


class Metrics:
  """The server's counters, gauges and latency histograms."""

  def __init__(self, window_s: float = 10.0, clock=time.monotonic):
    self._lock = threading.Lock()
    self._clock = clock
    self.window_s = window_s
    self.waiting = 0
    self.running = 0
    self.prompt_tokens = 0
    self.generation_tokens = 0
    self.finished: collections.Counter[str] = collections.Counter()
    self.rejected: collections.Counter[str] = collections.Counter()
    self.ttft = Histogram(TTFT_BUCKETS)
    self.tpot = Histogram(TPOT_BUCKETS)
    self.e2e = Histogram(E2E_BUCKETS)
    self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens)
    self.speculation: dict | None = None  # `Engine.speculation`, copied
    self.prefix_cache: dict | None = None  # `Engine.prefix_cache`, copied
    self.transfers: dict | None = None  # `Engine.transfers`, copied

  def set_transfers(self, counts: dict | None) -> None:
    with self._lock:
      self.transfers = None if counts is None else dict(counts)

  def set_prefix_cache(self, counts: dict | None) -> None:
    with self._lock:
      self.prefix_cache = None if counts is None else dict(counts)

  def set_speculation(self, counts: dict | None) -> None:
    with self._lock:
      self.speculation = None if counts is None else dict(counts)

  def set_queue(self, waiting: int, running: int) -> None:
    with self._lock:
      self.waiting, self.running = waiting, running

  def add_prompt(self, n_tokens: int) -> None:
    with self._lock:
      self.prompt_tokens += n_tokens

  def add_generated(self, n_tokens: int) -> None:
    with self._lock:
      self.generation_tokens += n_tokens
      self._recent.append((self._clock(), n_tokens))

  def reject(self, reason: str) -> None:
    with self._lock:
      self.rejected[reason] += 1

  def finish(self, reason: str, arrival: float, first_token: float | None, end: float, n_tokens: int) -> None:
    """One finished request; times from the same clock as `Metrics(clock=...)`."""
    with self._lock:
      self.finished[reason] += 1
      if first_token is None:
        return  # aborted before its first token: no latency to report
      self.ttft.observe(first_token - arrival)
      self.e2e.observe(end - arrival)
      if n_tokens > 1:
        self.tpot.observe((end - first_token) / (n_tokens - 1))

  def _rate_locked(self) -> float:
    now = self._clock()
    while self._recent and self._recent[0][0] < now - self.window_s:
      self._recent.popleft()
    return sum(n for _, n in self._recent) / self.window_s

  def render(self) -> str:
    """The Prometheus text format of every metric."""
    with self._lock:
      lines: list[str] = []

      def metric(name: str, kind: str, help_: str, samples: list[str]) -> None:
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples])

      def one(name: str, kind: str, help_: str, value: float) -> None:
        metric(name, kind, help_, [f"{name} {value!r}"])

      metric("shardlab_num_requests_waiting", "gauge", "Requests accepted and waiting for a decode slot.",
             [f"shardlab_num_requests_waiting {self.waiting}"])
      metric("shardlab_num_requests_running", "gauge", "Requests holding a decode slot.",
             [f"shardlab_num_requests_running {self.running}"])
      metric("shardlab_generation_tokens_per_second", "gauge",
             f"Output tokens per second over the last {self.window_s:g} s.",
             [f"shardlab_generation_tokens_per_second {self._rate_locked()!r}"])
      metric("shardlab_prompt_tokens_total", "counter", "Prompt tokens of accepted requests.",
             [f"shardlab_prompt_tokens_total {self.prompt_tokens}"])
      metric("shardlab_generation_tokens_total", "counter", "Generated tokens.",
             [f"shardlab_generation_tokens_total {self.generation_tokens}"])
      metric("shardlab_request_success_total", "counter", "Finished requests by finish reason.",
             [f'shardlab_request_success_total{{finished_reason="{r}"}} {self.finished[r]}'
              for r in ("stop", "length", "abort")])
      metric("shardlab_request_rejected_total", "counter", "Requests refused before reaching the engine.",
             [f'shardlab_request_rejected_total{{reason="{r}"}} {self.rejected[r]}'
              for r in ("queue_full", "draining", "invalid")])
      metric("shardlab_time_to_first_token_seconds", "histogram", "Arrival to first token.",
             self.ttft.lines("shardlab_time_to_first_token_seconds"))
      metric("shardlab_time_per_output_token_seconds", "histogram",
             "Per request: (last token - first token) / (output tokens - 1).",
             self.tpot.lines("shardlab_time_per_output_token_seconds"))
      metric("shardlab_e2e_request_latency_seconds", "histogram", "Arrival to last token.",
             self.e2e.lines("shardlab_e2e_request_latency_seconds"))
      if self.prefix_cache is not None:
        c = self.prefix_cache
        one("shardlab_prefix_cache_queries_total", "counter", "Prompt tokens of admitted requests.",
            c["queried_tokens"])
        one("shardlab_prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.",
            c["matched_tokens"])
        one("shardlab_prefix_cache_hit_rate", "gauge", "Prompt tokens found in the prefix cache, of all so far.",
            c["matched_tokens"] / max(c["queried_tokens"], 1))
        used = c["pages"] - c["pages_free"] - c["pages_cached"]
        metric("shardlab_kv_cache_pages", "gauge", "KV-cache pages: free, cached (evictable), used by requests.",
               [f'shardlab_kv_cache_pages{{state="{k}"}} {v}'
                for k, v in (("free", c["pages_free"]), ("cached", c["pages_cached"]), ("used", used))])
        one("shardlab_kv_cache_pages_evicted_total", "counter", "Pages taken back from the prefix cache.",
            c["pages_evicted"])
      if self.transfers is not None:
        t = self.transfers
        one("shardlab_kv_transfers_total", "counter", "Prompts whose keys and values moved to the decode devices.",
            t["count"])
        one("shardlab_kv_transfer_bytes_total", "counter", "Bytes of keys and values moved to the decode devices.",
            t["bytes"])
        one("shardlab_kv_transfer_seconds_total", "counter", "Seconds spent moving keys and values.", t["seconds"])
      if self.speculation is not None:
        s = self.speculation
        one("shardlab_spec_decode_num_draft_tokens_total", "counter", "Tokens the draft model proposed.",
            s["proposed"])
        one("shardlab_spec_decode_num_accepted_tokens_total", "counter", "Proposed tokens the model accepted.",
            s["accepted"])
        one("shardlab_spec_decode_draft_acceptance_rate", "gauge", "Accepted over proposed tokens so far.",
            s["accepted"] / max(s["proposed"], 1))
        one("shardlab_spec_decode_tokens_per_round", "gauge", "Tokens a request gets per speculative round.",
            1 + s["accepted"] / max(s["rounds"], 1))
      return "\n".join(lines) + "\n"
