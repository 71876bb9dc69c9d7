"""/metrics text: parsed by prometheus_client's own parser, values checked against numpy."""

from __future__ import annotations

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from serving.metrics import TTFT_BUCKETS, Metrics


class Clock:
  def __init__(self):
    self.now = 1000.0

  def __call__(self) -> float:
    return self.now


def _families(metrics: Metrics) -> dict:
  return {f.name: f for f in text_string_to_metric_families(metrics.render())}


def test_histograms_counters_and_gauges_parse_and_match():
  clock = Clock()
  m = Metrics(window_s=10.0, clock=clock)
  rng = np.random.default_rng(0)
  ttfts = rng.exponential(0.3, 50)
  for i, ttft in enumerate(ttfts):
    m.finish("length" if i % 3 else "stop", arrival=0.0, first_token=float(ttft), end=float(ttft) + 1.0,
             n_tokens=11)
  m.finish("abort", arrival=0.0, first_token=None, end=0.5, n_tokens=0)  # no latency recorded
  m.set_queue(waiting=3, running=5)
  m.add_prompt(17)
  m.reject("queue_full")
  fams = _families(m)

  ttft = {s.labels.get("le"): s.value for s in fams["shardlab_time_to_first_token_seconds"].samples
          if s.name.endswith("_bucket")}
  for bound in TTFT_BUCKETS:
    assert ttft[repr(float(bound))] == np.sum(ttfts <= bound)
  assert ttft["+Inf"] == len(ttfts)
  samples = {s.name: s.value for s in fams["shardlab_time_to_first_token_seconds"].samples}
  assert np.isclose(samples["shardlab_time_to_first_token_seconds_sum"], ttfts.sum())
  tpot = {s.name: s.value for s in fams["shardlab_time_per_output_token_seconds"].samples}
  assert tpot["shardlab_time_per_output_token_seconds_count"] == 50
  assert np.isclose(tpot["shardlab_time_per_output_token_seconds_sum"], 50 * 1.0 / 10)

  success = {s.labels["finished_reason"]: s.value for s in fams["shardlab_request_success"].samples}
  assert success == {"stop": 17, "length": 33, "abort": 1}
  assert fams["shardlab_num_requests_waiting"].samples[0].value == 3
  assert fams["shardlab_num_requests_running"].samples[0].value == 5
  assert fams["shardlab_prompt_tokens"].samples[0].value == 17
  rejected = {s.labels["reason"]: s.value for s in fams["shardlab_request_rejected"].samples}
  assert rejected["queue_full"] == 1 and rejected["invalid"] == 0


def test_tokens_per_second_counts_the_last_window_only():
  clock = Clock()
  m = Metrics(window_s=10.0, clock=clock)
  m.add_generated(500)
  clock.now += 8
  m.add_generated(100)
  rate = lambda: _families(m)["shardlab_generation_tokens_per_second"].samples[0].value
  assert rate() == 60.0
  clock.now += 5  # the first 500 fall out of the window
  assert rate() == 10.0
  assert _families(m)["shardlab_generation_tokens"].samples[0].value == 600


def test_speculative_decoding_metrics_appear_with_a_draft_only():
  m = Metrics()
  assert not any(name.startswith("shardlab_spec_decode") for name in _families(m))
  m.set_speculation({"rounds": 10, "proposed": 40, "accepted": 26})
  fams = _families(m)
  value = lambda name: fams[name].samples[0].value
  assert value("shardlab_spec_decode_num_draft_tokens") == 40
  assert value("shardlab_spec_decode_num_accepted_tokens") == 26
  assert np.isclose(value("shardlab_spec_decode_draft_acceptance_rate"), 26 / 40)
  assert np.isclose(value("shardlab_spec_decode_tokens_per_round"), 1 + 26 / 10)


def test_prefix_cache_metrics_appear_with_paging_only():
  m = Metrics()
  assert not any(name.startswith(("shardlab_prefix_cache", "shardlab_kv_cache")) for name in _families(m))
  m.set_prefix_cache({"queried_tokens": 200, "matched_tokens": 120, "pages_free": 10, "pages_cached": 6,
                      "pages_evicted": 3, "pages": 32})
  fams = _families(m)
  assert fams["shardlab_prefix_cache_queries"].samples[0].value == 200
  assert fams["shardlab_prefix_cache_hits"].samples[0].value == 120
  assert np.isclose(fams["shardlab_prefix_cache_hit_rate"].samples[0].value, 0.6)
  pages = {s.labels["state"]: s.value for s in fams["shardlab_kv_cache_pages"].samples}
  assert pages == {"free": 10, "cached": 6, "used": 16}
  assert fams["shardlab_kv_cache_pages_evicted"].samples[0].value == 3


def test_transfer_metrics_appear_when_disaggregated_only():
  m = Metrics()
  assert "shardlab_kv_transfers" not in _families(m)
  m.set_transfers({"count": 3, "bytes": 4096, "seconds": 0.25})
  fams = _families(m)
  assert fams["shardlab_kv_transfers"].samples[0].value == 3
  assert fams["shardlab_kv_transfer_bytes"].samples[0].value == 4096
  assert fams["shardlab_kv_transfer_seconds"].samples[0].value == 0.25
