"""Speculative decoding (serving/speculative.py): the rejection rule by hand and in distribution,
and the engine's speculative output against the full forward pass (greedy: token for token; sampled:
the log-probabilities of what it drew)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.transformer import Transformer
from parallel.mesh import make_mesh
from parallel.plan import make_plan, single_device_plan
from serving.engine import Draft, Request, SamplingParams
from serving.sampling import filter_logits
from serving.runner import ModelRunner
from serving.speculative import SpeculativeRunner, accept, filtered_probs
from tests.serving import tiny
from tests.serving.tiny import greedy, make_engine, run

DRAFT_CFG = dataclasses.replace(tiny.CFG, n_layers=1, d_ff=32)


def _keys(b, k, seed=0):
  return jax.random.split(jax.random.key(seed), b * k).reshape(b, k)


def test_accept_rule_by_hand():
  """Row 0: the draft's distributions are the target's, so both proposals pass and the extra
  token comes from p_3 (one-hot at 2). Row 1: p_1(0) / q_1(0) = 0.25 < u = 0.3 rejects the first
  proposal; the residual max(0, p_1 - q_1) is all on token 1. Row 2: u = 0.2 < 0.25 accepts it, and
  the second proposal has p_2 = 0: rejected, residual p_2 - q_2 clipped is all on token 2."""
  p1 = [0.2, 0.8, 0.0]
  q1 = [0.8, 0.2, 0.0]
  p = jnp.asarray([[[0.5, 0.5, 0.0], [0.1, 0.2, 0.7], [0.0, 0.0, 1.0]],
                   [p1, [0.1, 0.2, 0.7], [1.0, 0.0, 0.0]],
                   [p1, [0.0, 0.5, 0.5], [1.0, 0.0, 0.0]]])
  q = jnp.asarray([[[0.5, 0.5, 0.0], [0.1, 0.2, 0.7]],
                   [q1, [0.3, 0.3, 0.4]],
                   [q1, [1.0, 0.0, 0.0]]])
  proposals = jnp.asarray([[1, 2], [0, 1], [0, 0]])
  uniforms = jnp.asarray([[0.99, 0.99], [0.3, 0.0], [0.2, 0.5]])
  n, token = accept(p, q, proposals, uniforms, _keys(3, 3))
  assert n.tolist() == [2, 0, 1]
  assert token.tolist()[:2] == [2, 1]
  assert int(token[2]) in (1, 2)  # row 2's residual: max(0, [0, .5, .5] - [1, 0, 0]), half on each


@pytest.mark.parametrize("seed", [0, 1])
def test_speculative_tokens_follow_the_target_distribution(seed):
  """With context-free distributions (p_i, q_i fixed per position, on a vocabulary of 5), the first
  token a round emits follows p_1, and, given the first proposal was accepted, the second follows
  p_2, over 200,000 rounds: a chi-square test at a one-in-a-million false alarm rate. (The draft's
  own q_1 differs from p_1 by far more than the test resolves.)"""
  v, k, n_rounds = 5, 2, 200_000
  rng = np.random.default_rng(seed)
  dist = lambda: rng.dirichlet(np.ones(v) * 0.7)
  p = np.stack([dist() for _ in range(k + 1)])
  q = np.stack([dist() for _ in range(k)])
  kx, ku, kr = jax.random.split(jax.random.key(seed), 3)
  proposals = jnp.stack([jax.random.categorical(key, jnp.log(q[i]), shape=(n_rounds,))
                         for i, key in enumerate(jax.random.split(kx, k))], axis=1).astype(jnp.int32)
  uniforms = jax.random.uniform(ku, (n_rounds, k))
  tile = lambda a: jnp.broadcast_to(jnp.asarray(a, jnp.float32), (n_rounds, *a.shape))
  n, last = jax.jit(accept)(tile(p), tile(q), proposals, uniforms, jax.random.split(kr, n_rounds * (k + 1)).reshape(n_rounds, k + 1))
  n, last, proposals = np.asarray(n), np.asarray(last), np.asarray(proposals)
  first = np.where(n >= 1, proposals[:, 0], last)
  second = np.where(n >= 2, proposals[:, 1], last)[n >= 1]

  def chi2(samples, want):
    counts = np.bincount(samples, minlength=v)
    expected = want * len(samples)
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())

  critical = 33.4  # chi-square, 4 degrees of freedom, p = 1e-6
  assert chi2(first, p[0]) < critical
  assert chi2(second, p[1]) < critical
  assert chi2(first, q[0]) > critical, "the draft's own distribution is not told apart: the test is too weak"


def test_filtered_probs_are_the_sampler_distribution():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((3, 11)) * 3, jnp.float32)
  temperature, top_k, top_p = jnp.asarray([0.0, 0.7, 1.3]), jnp.asarray([0, 3, 0]), jnp.asarray([1.0, 1.0, 0.6])
  got = np.asarray(filtered_probs(logits, temperature, top_k, top_p))
  np.testing.assert_array_equal(got[0], np.eye(11)[int(np.argmax(logits[0]))])
  for r in (1, 2):
    want = np.asarray(jax.nn.softmax(filter_logits(logits[r], temperature[r], top_k[r], top_p[r])))
    np.testing.assert_allclose(got[r], want, rtol=1e-6, atol=1e-7)
  assert (got[1] > 0).sum() == 3


def _draft(params, tokens=3):
  return Draft(DRAFT_CFG, params, tokens)


def _draft_params(seed=5):
  return tiny.params_of(Transformer(DRAFT_CFG, rngs=nnx.Rngs(seed)))


PROMPTS = [tiny.PATTERN[:5], np.tile(tiny.PATTERN, 2)[3:24], tiny.PATTERN[9:11], np.tile(tiny.PATTERN, 2)[1:30],
           tiny.PATTERN[2:14]]


@pytest.mark.parametrize("which,rounds,disaggregate", [("trained", 1, True), ("random", 3, False)])
def test_speculative_greedy_equals_plain_greedy(which, rounds, disaggregate):
  """Greedy speculative output is the full forward pass's argmax at every step, token for token,
  for five prompts through three slots (requests joining as others finish), whether the draft
  agrees with the target often (both trained on the same cycle) or rarely (random). The trained
  pair runs on two sub-meshes: prompts (the target's and the draft's) on one device, decoding on
  another, both caches' prompts moved across (a draft without its prompt would lose its high
  acceptance); the random pair runs three rounds per engine step (requests end inside a call, and
  join after it)."""
  params = tiny.trained_params() if which == "trained" else tiny.random_params()
  draft = tiny.trained_params(cfg=DRAFT_CFG) if which == "trained" else _draft_params()
  plan = make_plan(make_mesh({"data": 2}, jax.devices()[:2])) if disaggregate else single_device_plan()
  engine = make_engine(params, draft=_draft(draft), decode_steps=rounds, plan=plan, disaggregate=disaggregate)
  out = run(engine, [greedy(str(i), p, 11) for i, p in enumerate(PROMPTS)])
  for i, p in enumerate(PROMPTS):
    tokens, logprobs, _ = tiny.reference_decode(params, p, 11)
    assert out[str(i)][0] == tokens, f"request {i}"
    np.testing.assert_allclose(out[str(i)][1], logprobs, rtol=1e-4, atol=1e-4)
  stats = engine.speculation
  rate = stats["accepted"] / stats["proposed"]
  assert stats["rounds"] > 0
  if which == "trained":
    assert rate > 0.5, stats  # the draft learned the same cycle
  assert sum(len(out[str(i)][0]) for i in range(len(PROMPTS))) == len(PROMPTS) * 11
  if disaggregate:  # each prompt moved twice: the target's keys and values, then the draft's
    assert engine.transfers["count"] == 2 * len(PROMPTS), engine.transfers


def test_speculative_with_the_target_as_draft_accepts_every_proposal():
  """The target drafting for itself: every proposal is its own argmax, so every round emits k + 1
  tokens (barring float rounding between a one-token step and a chunk, which this model does not meet).
  Every round then leaves the draft without its last proposal's keys: the next round's first step
  must write them, and so must the step after a call's last round (two rounds per call here); a
  draft that missed either would read a hole in its cache, propose other tokens and be rejected."""
  params = tiny.random_params()
  for rounds in (1, 2):
    engine = make_engine(params, draft=Draft(tiny.CFG, params, 4), decode_steps=rounds)
    out = run(engine, [greedy("a", PROMPTS[1], 26)])
    assert out["a"][0] == tiny.reference_decode(params, PROMPTS[1], 26)[0]
    assert engine.speculation["accepted"] == engine.speculation["proposed"] >= 20, (rounds, engine.speculation)


def test_speculative_call_stops_once_every_request_is_done(monkeypatch):
  """A call that may finish every request runs rounds until none has tokens left to emit, not all
  of them. With the target drafting for itself every round emits k + 1 = 5 tokens, and a call has 4
  rounds (up to 20 tokens): a request of 30 tokens (the first from its prompt, 29 left) cannot end
  in its first call, which runs every round; its second (9 left) needs 2 rounds, and the 2 after
  them do not run (count 0). A request of 7 tokens needs 2 rounds of its only call. The texts are
  still the reference's; the warm-ups traced both loops (greedy and sampled) and the prefill of
  both models for the caches' layouts that the requests meet: nothing more is traced, so nothing
  more is compiled."""
  traced = []

  def counting(trace):
    def traces(self, *args, **kwargs):
      traced.append((trace.__name__, kwargs))
      return trace(self, *args, **kwargs)
    return traces

  monkeypatch.setattr(SpeculativeRunner, "_rounds_fn", counting(SpeculativeRunner._rounds_fn))
  monkeypatch.setattr(ModelRunner, "_prefill_fn", counting(ModelRunner._prefill_fn))
  params = tiny.random_params()
  engine = make_engine(params, draft=Draft(tiny.CFG, params, 4), decode_steps=4)
  speculative, calls = engine._replicas[0].speculative, []
  warmed = engine.warm_up_decode() + engine.warm_up_prefill()
  assert warmed == len(traced) > 4, traced
  rounds = speculative.rounds

  def recording(*args, **kwargs):
    out = rounds(*args, **kwargs)
    calls.append(np.asarray(out[2])[:, 0].tolist())
    return out

  speculative.rounds = recording
  for n, want in ((30, [[5, 5, 5, 5], [5, 5, 0, 0]]), (7, [[5, 5, 0, 0]])):
    calls.clear()
    out = run(engine, [greedy("a", PROMPTS[1], n)])
    assert out["a"][0] == tiny.reference_decode(params, PROMPTS[1], n)[0]
    assert calls == want, (n, calls)
  assert len(traced) == warmed, traced[warmed:]


def test_speculative_sampling_is_seeded_and_scored_by_the_target():
  """Sampled speculative requests: the same seed gives the same text (alone, or beside another
  request with three rounds per engine step: the draws follow the output index, which the device
  carries between rounds), and each token's log-probability is the target's full forward pass's."""
  params, draft = tiny.trained_params(), tiny.trained_params(cfg=DRAFT_CFG)
  req = lambda rid, seed: Request(rid, tuple(int(t) for t in PROMPTS[0]),
                                  SamplingParams(max_tokens=12, temperature=1.3, top_k=50, seed=seed, logprobs=True))
  first = run(make_engine(params, draft=_draft(draft)), [req("a", 7)])["a"]
  again = run(make_engine(params, draft=_draft(draft), decode_steps=3), [req("b", 3), req("a", 7)])["a"]
  assert first[0] == again[0] and len(first[0]) == 12
  seq = list(PROMPTS[0]) + first[0]
  padded = np.zeros((1, tiny.MAX_LEN), np.int32)
  padded[0, :len(seq)] = seq
  logits = np.asarray(tiny.forward_fn(tiny.CFG)(params, padded))[0].astype(np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  start = len(PROMPTS[0]) - 1
  want = [logp[start + j, t] for j, t in enumerate(first[0])]
  np.testing.assert_allclose(first[1], want, rtol=1e-4, atol=1e-4)


def test_speculative_engine_refusals():
  params = tiny.random_params()
  with pytest.raises(ValueError, match="vocab_size=300 differs"):
    make_engine(params, draft=Draft(dataclasses.replace(DRAFT_CFG, vocab_size=300),
                                    tiny.params_of(Transformer(dataclasses.replace(DRAFT_CFG, vocab_size=300),
                                                               rngs=nnx.Rngs(0)))))
  with pytest.raises(ValueError, match="speculative_tokens=0"):
    make_engine(params, draft=_draft(_draft_params(), tokens=0))
  with pytest.raises(ValueError, match="the draft's model.max_seq_len=32"):
    make_engine(params, draft=Draft(dataclasses.replace(DRAFT_CFG, max_seq_len=32), _draft_params()))
