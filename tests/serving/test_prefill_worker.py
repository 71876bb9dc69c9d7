"""Disaggregation across two processes: prompts computed by a prefill worker process
(`python -m serving.prefill_worker`), their keys and values sent over TCP on 127.0.0.1, decoded by
the engine here; the same tokens and log-probabilities as the colocated engine, with a contiguous
cache, and with a paged one shared through the prefix tree and a draft model beside it."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
from serving.engine import Draft, Paging, Request, SamplingParams
from serving.loading import load
from tests import runs
from tests.serving.tiny import greedy, make_engine, run

SERVED = ["model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64", "model.max_seq_len=64",
          "data.seq_len=64", "model.init_std=0.5"]


def _worker(*flags):
  """A prefill worker on two emulated devices (tensor-parallel over both), the served model's
  initialisation; yields its address."""
  cmd = [sys.executable, "-m", "serving.prefill_worker", "--config=tiny", "--slots=4", "--max_len=64", "--port=0",
         "--set=mesh.tensor=2", *[f"--set={o}" for o in SERVED], *flags]
  proc = subprocess.Popen(cmd, cwd=runs.REPO, env=runs.env(devices=2), stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  try:
    line = proc.stdout.readline()
    assert "prefill worker listening on 127.0.0.1:" in line, line
    yield line.rsplit(" ", 1)[1].strip()
  finally:
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def worker():
  yield from _worker()


@pytest.fixture(scope="module")
def paged_worker():
  """Pages of 4 positions, and a draft model: the served model's preset and initialisation."""
  yield from _worker("--page_size=4", "--num_pages=48", "--draft_config=tiny", *[f"--draft_set={o}" for o in SERVED])


def _served():
  loaded = load(configs.get_config("tiny", SERVED), devices=jax.devices()[:1])
  return loaded.config.model, loaded.params, loaded.plan


def test_prompts_from_a_worker_process_decode_as_colocated(worker):
  model, params, plan = _served()
  rng = np.random.default_rng(2)
  requests = [greedy(str(i), rng.integers(0, 256, n), 7) for i, n in enumerate((4, 21, 9))]
  requests.append(Request("s", (5, 6, 7, 8), SamplingParams(max_tokens=7, temperature=1.0, top_k=20, seed=4,
                                                             logprobs=True)))
  with pytest.raises(ValueError, match="serves .*'slots': 4.*needs .*'slots': 2"):
    make_engine(params, cfg=model, slots=2, plan=plan, prefill_worker=worker)  # disconnects, refused
  want = run(make_engine(params, cfg=model, slots=4, plan=plan), requests)
  engine = make_engine(params, cfg=model, slots=4, plan=plan, prefill_worker=worker)
  # The worker compiles its prefills: chunks of the one bucket (the budget, 16) in 1, 2 or 4 rows
  # (4 slots), greedy and sampled.
  assert engine.warm_up_prefill() == 6
  got = run(engine, requests, joins=None)
  assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in want.items()}
  for k in want:
    np.testing.assert_allclose(got[k][1], want[k][1], rtol=1e-4, atol=1e-4)
  moved = engine.transfers
  assert moved["count"] == len(requests) and moved["bytes"] > 0 and moved["seconds"] > 0


def test_worker_with_pages_and_a_draft_decodes_as_colocated(paged_worker):
  """The worker's caches paged with the engine's tables, and a draft model there too: later prompts
  find the first one's blocks in the prefix tree and the worker computes only their own pages, both
  models' pages move (one move per model per prompt, exactly the computed pages' bytes), and the
  answers are the plain colocated engine's. The draft is the served model itself, so it accepts
  every proposal only if its prompts' keys and values arrived whole."""
  model, params, plan = _served()
  rng = np.random.default_rng(3)
  system = list(rng.integers(0, 256, 10))
  prompts = [system + list(rng.integers(0, 256, n)) for n in (3, 6, 1, 9)]
  requests = [greedy(str(i), p, 6) for i, p in enumerate(prompts)]
  want = run(make_engine(params, cfg=model, slots=4, plan=plan), requests)
  with pytest.raises(ValueError, match="serves .*'pages': 48.*needs .*'pages': 0"):
    make_engine(params, cfg=model, slots=4, plan=plan, prefill_worker=paged_worker)
  engine = make_engine(params, cfg=model, slots=4, plan=plan, prefill_worker=paged_worker,
                       paging=Paging(page_size=4, pages=48), draft=Draft(model, params, 3))
  got = run(engine, requests[:1], joins={2: requests[1:]})
  assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in want.items()}
  for k in want:
    np.testing.assert_allclose(got[k][1], want[k][1], rtol=1e-4, atol=1e-4)
  cached = engine.prefix_cache["matched_tokens"]
  assert cached == 3 * 8, engine.prefix_cache  # the system prompt's two whole blocks, for each later prompt
  assert engine.speculation["accepted"] == engine.speculation["proposed"] > 0, engine.speculation
  page_bytes = 2 * model.n_layers * model.n_kv_heads * 4 * model.resolved_head_dim * jnp.dtype(model.compute_dtype).itemsize
  computed_pages = sum(-(-len(p) // 4) for p in prompts) - cached // 4
  moved = engine.transfers
  assert moved["count"] == 2 * len(prompts) and moved["bytes"] == 2 * page_bytes * computed_pages, moved

