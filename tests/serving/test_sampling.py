"""Sampling against numpy: the top-k / top-p masks, log-probabilities, greedy rows, the
distribution of draws, and per-request seeds (same seed same tokens, wherever the row sits)."""

import jax
import numpy as np
import pytest

from serving.sampling import filter_logits, sample

_filter = jax.jit(jax.vmap(filter_logits))
_sample = jax.jit(sample)


def np_kept(logits, temperature, top_k, top_p):
  """Ids kept by temperature -> top-k -> top-p, written out in numpy (stable sort: ties keep the lower id)."""
  scaled = logits.astype(np.float64) / temperature
  order = np.argsort(-scaled, kind="stable")
  n = len(order) if top_k <= 0 else top_k
  top = order[:n]
  probs = np.exp(scaled[top] - scaled[top].max())
  probs /= probs.sum()
  kept = []
  total = 0.0
  for i, p in zip(top, probs):
    if top_p < 1.0 and total >= top_p:
      break
    kept.append(int(i))
    total += p
  return set(kept)


def np_log_softmax(x):
  x = x.astype(np.float64)
  return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


ROWS = [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (1.0, 8, 0.3), (0.5, 1, 1.0), (2.0, 40, 0.95), (1.0, 0, 0.05)]


def test_filter_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((len(ROWS), 40)).astype(np.float32) * 2
  logits[1, [3, 9, 17]] = logits[1].max() + 1  # a tie at the top-k boundary
  t, k, p = (np.asarray(c, dt) for c, dt in zip(zip(*ROWS), (np.float32, np.int32, np.float32)))
  got = np.asarray(_filter(logits, t, k, p))
  for i, row in enumerate(ROWS):
    want = np_kept(logits[i], *row)
    assert set(np.flatnonzero(np.isfinite(got[i])).tolist()) == want, f"row {i} {row}"
    kept = sorted(want)
    np.testing.assert_allclose(got[i, kept], logits[i, kept] / row[0], rtol=1e-6)


def _rows(n, t, k, p, seed, index):
  return (np.full(n, t, np.float32), np.full(n, k, np.int32), np.full(n, p, np.float32),
          np.asarray(seed, np.uint32) * np.ones(n, np.uint32), np.asarray(index, np.int32) * np.ones(n, np.int32))


def test_greedy_rows_and_logprobs():
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((6, 50)).astype(np.float32)
  t = np.asarray([0, 0.8, 0, 1.0, 0, 2.0], np.float32)
  rows = (t, np.zeros(6, np.int32), np.ones(6, np.float32), np.arange(6, dtype=np.uint32), np.zeros(6, np.int32))
  tokens, logprobs = map(np.asarray, _sample(logits, *rows))
  greedy = t == 0
  np.testing.assert_array_equal(tokens[greedy], logits[greedy].argmax(-1))
  want = np_log_softmax(logits)[np.arange(6), tokens]
  np.testing.assert_allclose(logprobs, want, rtol=1e-5)


def test_greedy_program_is_argmax_with_logprobs():
  """The static greedy program (every row at temperature 0): numpy's argmax and log_softmax."""
  logits = np.random.default_rng(3).standard_normal((5, 50)).astype(np.float32) * 3
  rows = (np.zeros(5, np.float32), np.zeros(5, np.int32), np.ones(5, np.float32), np.zeros(5, np.uint32),
          np.zeros(5, np.int32))
  tokens, logprobs = map(np.asarray, jax.jit(sample, static_argnames="greedy")(logits, *rows, greedy=True))
  np.testing.assert_array_equal(tokens, logits.argmax(-1))
  np.testing.assert_allclose(logprobs, np_log_softmax(logits)[np.arange(5), tokens], rtol=1e-5)


@pytest.mark.parametrize("row", ROWS[1:4])
def test_draws_stay_in_the_kept_set(row):
  logits = np.random.default_rng(2).standard_normal((1, 40)).astype(np.float32) * 2
  n = 512
  tokens, _ = _sample(np.repeat(logits, n, 0), *_rows(n, *row, seed=np.arange(n), index=0))
  assert set(np.asarray(tokens).tolist()) <= np_kept(logits[0], *row)


def test_draws_follow_the_softmax():
  """4096 draws at temperature 0.8 over 4 tokens: each frequency within 4 sigma of its probability."""
  logits = np.asarray([[1.0, 0.0, -0.5, 0.5]], np.float32)
  n = 4096
  tokens, _ = _sample(np.repeat(logits, n, 0), *_rows(n, 0.8, 0, 1.0, seed=7, index=np.arange(n)))
  freq = np.bincount(np.asarray(tokens), minlength=4) / n
  probs = np.exp(logits[0] / 0.8) / np.exp(logits[0] / 0.8).sum()
  assert np.all(np.abs(freq - probs) <= 4 * np.sqrt(probs * (1 - probs) / n)), (freq, probs)


def test_seed_decides_the_draw_wherever_the_row_sits():
  rng = np.random.default_rng(3)
  logits = rng.standard_normal((16, 64)).astype(np.float32)
  seeds = np.arange(100, 116, dtype=np.uint32)
  a, _ = _sample(logits, *_rows(16, 1.0, 0, 1.0, seed=seeds, index=5))
  b, _ = _sample(logits, *_rows(16, 1.0, 0, 1.0, seed=seeds, index=5))
  np.testing.assert_array_equal(a, b)
  c, _ = _sample(logits, *_rows(16, 1.0, 0, 1.0, seed=seeds + 1000, index=5))
  assert (np.asarray(a) != np.asarray(c)).any()
  perm = rng.permutation(16)
  d, _ = _sample(logits[perm], *_rows(16, 1.0, 0, 1.0, seed=seeds[perm], index=5))
  np.testing.assert_array_equal(np.asarray(d), np.asarray(a)[perm])
