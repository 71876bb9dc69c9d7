"""Continuous batching with chunked prefill: the scheduler's budget split, and the engine with
requests joining and leaving, long prompts chunked and a multi-step decode loop giving exactly
what each request gives decoded alone."""

import numpy as np

from serving.engine import Request, SamplingParams
from serving.scheduler import Scheduler, Sequence
from tests.serving import tiny
from tests.serving.tiny import greedy, make_engine, run


def seq(rid, n):
  return Sequence(Request(rid, (1,) * n, SamplingParams(max_tokens=4)), seed=0)


def test_budget_splits_decode_tokens_then_prompt_chunks():
  s = Scheduler(slots=3, token_budget=8, max_chunk=8)
  a, b, c, d = seq("a", 20), seq("b", 3), seq("c", 5), seq("d", 2)
  for x in (a, b, c, d):
    s.add(x)
  plan = s.schedule()  # a, b, c admitted in order; a's first chunk takes the whole budget
  assert [x.slot for x in (a, b, c)] == [0, 1, 2] and list(s.waiting) == [d]
  assert plan.decode == [] and plan.chunks == [(a, 0, 8)]
  a.prefilled = 8
  assert s.schedule().chunks == [(a, 8, 8)]
  a.prefilled = 16
  assert s.schedule().chunks == [(a, 16, 4), (b, 0, 3), (c, 0, 1)]  # short prompts fill the rest
  a.prefilled, b.prefilled, c.prefilled = 20, 3, 1
  plan = s.schedule()
  assert plan.decode == [a, b] and plan.chunks == [(c, 1, 4)]  # two decode tokens, then c's rest
  s.remove("b")  # b leaves, d joins its slot at the next step
  plan = s.schedule()
  assert d.slot == 1 and plan.chunks == [(c, 1, 4), (d, 0, 2)]


def test_token_budget_below_slots_is_refused():
  try:
    Scheduler(slots=4, token_budget=3, max_chunk=16)
  except ValueError as err:
    assert "token_budget=3" in str(err)
  else:
    raise AssertionError("no error")


def _requests():
  """Greedy and seeded-sampling requests, prompts from 2 to 40 tokens (beyond the budget of 16)."""
  rng = np.random.default_rng(5)
  out = []
  for i, (n, max_tokens) in enumerate([(2, 9), (40, 5), (17, 12), (6, 3), (30, 7), (9, 10)]):
    prompt = tuple(int(t) for t in rng.integers(0, tiny.CFG.vocab_size, n))
    if i % 2:
      sampling = SamplingParams(max_tokens=max_tokens, temperature=0.9, top_k=30, top_p=0.9, seed=100 + i,
                                logprobs=True)
      out.append(Request(str(i), prompt, sampling))
    else:
      out.append(greedy(str(i), prompt, max_tokens))
  return out


def test_continuous_batching_equals_each_request_alone():
  """Six requests over three slots, three of them joining after the first steps; each one's
  tokens (greedy, and seeded samples) and log-probabilities equal those it gets alone."""
  params = tiny.random_params()
  engine = make_engine(params)
  requests = _requests()
  batched = run(engine, requests[:3], joins={2: requests[3:5], 4: requests[5:]})
  for r in requests:
    alone = run(engine, [r])[r.id]
    assert batched[r.id][0] == alone[0], f"request {r.id}"
    np.testing.assert_allclose(batched[r.id][1], alone[1], rtol=1e-5)
    assert batched[r.id][2] == "length"
    if r.sampling.temperature == 0:
      assert alone[0] == tiny.reference_decode(params, r.prompt_ids, r.sampling.max_tokens)[0]
  multi = run(make_engine(params, decode_steps=4), requests[:3], joins={2: requests[3:5], 4: requests[5:]})
  assert {k: v[0] for k, v in multi.items()} == {k: v[0] for k, v in batched.items()}
