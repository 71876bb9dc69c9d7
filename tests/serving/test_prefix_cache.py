"""The engine over a paged KV cache with prefix sharing: every answer equals the full forward pass
computed from scratch, whether its prefix came from the tree or not, under a page budget that
forces evictions, with speculative decoding on top, and with the decode kernel reading the pages in
place."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from parallel.mesh import make_mesh
from parallel.plan import make_plan

from serving.engine import Draft, Paging
from tests.serving import tiny
from tests.serving.tiny import greedy, make_engine, run

SYSTEM = list(np.tile(tiny.PATTERN, 2)[4:26])  # 22 tokens: five full blocks of 4
QUESTIONS = [tiny.PATTERN[:3], tiny.PATTERN[10:17], tiny.PATTERN[5:6], tiny.PATTERN[1:9], tiny.PATTERN[18:21],
             tiny.PATTERN[7:12]]


def _check(out, params, prompts, n):
  for i, p in enumerate(prompts):
    tokens, logprobs, _ = tiny.reference_decode(params, p, n)
    assert out[str(i)][0] == tokens, f"request {i}"
    np.testing.assert_allclose(out[str(i)][1], logprobs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_shared_prefixes_give_the_answers_computed_from_scratch(prefix_caching):
  """Six questions after one system prompt, two at first and the rest joining later (so the
  prompt's blocks are in the tree by then), through three slots; pages are all free or cached at
  the end."""
  params = tiny.trained_params()
  prompts = [SYSTEM + list(q) for q in QUESTIONS]
  requests = [greedy(str(i), p, 8) for i, p in enumerate(prompts)]
  engine = make_engine(params, paging=Paging(page_size=4, pages=48, prefix_caching=prefix_caching))
  out = run(engine, requests[:2], joins={3: requests[2:4], 6: requests[4:]})
  _check(out, params, prompts, 8)
  stats = engine.prefix_cache
  assert stats["queried_tokens"] == sum(len(p) for p in prompts)
  if prefix_caching:
    assert stats["matched_tokens"] >= 4 * 20, stats  # the four late requests found the prompt's five blocks
  else:
    assert stats["matched_tokens"] == 0
  assert stats["pages_free"] + stats["pages_cached"] == stats["pages"]


def test_eviction_under_a_small_page_budget_keeps_every_answer_right():
  """Two system prompts taking turns with 20 pages (a request needs 8 to 10): the tree must give
  pages back to admit new requests, and every answer is still the one computed from scratch."""
  params = tiny.trained_params()
  other = list(np.tile(tiny.PATTERN, 2)[11:29])
  prompts = [(SYSTEM if i % 2 == 0 else other) + list(q) for i, q in enumerate(QUESTIONS)]
  requests = [greedy(str(i), p, 8) for i, p in enumerate(prompts)]
  engine = make_engine(params, paging=Paging(page_size=4, pages=20))
  out = run(engine, requests[:2], joins={4: requests[2:4], 9: requests[4:]})
  _check(out, params, prompts, 8)
  stats = engine.prefix_cache
  assert stats["pages_evicted"] > 0 and stats["matched_tokens"] > 0, stats


def test_speculative_decoding_over_shared_pages():
  """The draft's cache is paged with the same tables: its shared prefix is the one it computed.
  After the decode warm-up the requests compile no round: assigning pages keeps the tables' layout,
  so the rounds compiled over empty tables are the ones the requests run."""
  params = tiny.trained_params()
  prompts = [SYSTEM + list(q) for q in QUESTIONS[:3]]
  requests = [greedy(str(i), p, 9) for i, p in enumerate(prompts)]
  draft = Draft(tiny.CFG, tiny.random_params(), 3)
  engine = make_engine(params, paging=Paging(page_size=4, pages=48), draft=draft)
  engine.warm_up_decode()
  with tiny.compiled_programs() as compiled:
    out = run(engine, requests[:1], joins={3: requests[1:]})
  _check(out, params, prompts, 9)
  assert engine.prefix_cache["matched_tokens"] > 0
  assert not [name for name in compiled if "_rounds_fn" in name], compiled


def test_disaggregated_pages_move_once_and_answers_stay_right():
  """Prompts on one device, decoding on another, both caches paged with the same tables: the four
  late requests find the system prompt's blocks in the tree and compute (and move) only their own
  pages, and every answer is the one computed from scratch."""
  params = tiny.trained_params()
  prompts = [SYSTEM + list(q) for q in QUESTIONS]
  requests = [greedy(str(i), p, 8) for i, p in enumerate(prompts)]
  plan = make_plan(make_mesh({"data": 2}, jax.devices()[:2]))
  engine = make_engine(params, plan=plan, disaggregate=True, paging=Paging(page_size=4, pages=48))
  out = run(engine, requests[:2], joins={3: requests[2:4], 6: requests[4:]})
  _check(out, params, prompts, 8)
  cached = engine.prefix_cache["matched_tokens"]
  assert cached >= 4 * 20, engine.prefix_cache
  moved = engine.transfers
  page_bytes = 2 * tiny.CFG.n_layers * tiny.CFG.n_kv_heads * 4 * tiny.CFG.resolved_head_dim * 4  # k and v, f32
  computed_pages = sum(-(-len(p) // 4) for p in prompts) - cached // 4
  assert moved["count"] == len(prompts) and moved["bytes"] == page_bytes * computed_pages, moved


def test_decode_kernel_reads_the_pages_in_place(monkeypatch):
  """`model.decode_attention='pallas'` over a paged cache: each decode step's kernel is handed the
  pool of pages and the page tables (nothing gathered), and every answer, shared prefix or not, is
  the one computed from scratch."""
  import models.attention  # noqa: PLC0415

  calls = []
  kernel = models.attention.decode_attention
  spy = lambda *a, **kw: calls.append((a[3].shape, kw.get("page_table") is not None)) or kernel(*a, **kw)
  monkeypatch.setattr(models.attention, "decode_attention", spy)
  params = tiny.trained_params()
  cfg = dataclasses.replace(tiny.CFG, decode_attention="pallas")
  prompts = [SYSTEM + list(q) for q in QUESTIONS[:4]]
  requests = [greedy(str(i), p, 8) for i, p in enumerate(prompts)]
  engine = make_engine(params, cfg=cfg, paging=Paging(page_size=16, pages=20), decode_steps=4)
  out = run(engine, requests[:2], joins={3: requests[2:]})
  _check(out, params, prompts, 8)
  assert engine.prefix_cache["matched_tokens"] >= 16 * 2, engine.prefix_cache  # the prompt's first page, shared
  pool = (tiny.CFG.n_layers, 20, tiny.CFG.n_kv_heads, 16, tiny.CFG.resolved_head_dim)
  assert calls and set(calls) == {(pool, True)}, f"the kernel read {set(calls)}"


def test_paging_refusals():
  params = tiny.random_params()
  with pytest.raises(ValueError, match="page_size=5 must be >= 1 and divide max_len=64"):
    make_engine(params, paging=Paging(page_size=5, pages=64))
  with pytest.raises(ValueError, match="pages=8 of 4 positions cannot hold one request of max_len=64"):
    make_engine(params, paging=Paging(page_size=4, pages=8))
