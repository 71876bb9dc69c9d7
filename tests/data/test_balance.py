"""Balancing attention work over data-parallel ranks: the work of a row by hand, the greedy order
against exhaustive search on small cases, and the dataset's balanced batches (deterministic, the
same rows, split over processes as one process splits them)."""

import itertools

import numpy as np
import pytest

from data import make_dataset
from data.balance import attention_work, balance_rows, imbalance
from tests.data.common import assert_batches_equal, small


def test_attention_work_is_the_sum_of_squared_document_lengths():
  seg = np.array([[1, 1, 1, 2, 2, 3], [1, 1, 1, 1, 1, 1], [1, 2, 3, 4, 5, 6]])
  np.testing.assert_array_equal(attention_work(seg), [9 + 4 + 1, 36, 6])


@pytest.mark.parametrize("seed", range(5))
def test_greedy_order_is_close_to_the_best_split(seed):
  rng = np.random.default_rng(seed)
  work = rng.pareto(1.5, 8) * 100 + 1
  order = balance_rows(work, 2)
  assert sorted(order.tolist()) == list(range(8))  # every row once
  best = min(imbalance(work, 2, np.array(list(p) + [i for i in range(8) if i not in p]))
             for p in itertools.combinations(range(8), 4))
  assert imbalance(work, 2, order) <= max(best * 1.34, best + 1e-12)  # within LPT's 4/3 - 1/(3m) bound
  assert imbalance(work, 2, order) <= imbalance(work, 2)


def test_balanced_dataset_reorders_rows_only(tmp_path):
  cfg = small(seq_len=64, global_batch=8)
  plain, balanced = make_dataset(cfg, vocab_size=512), make_dataset(cfg, vocab_size=512, balance_ranks=4)
  for step in (0, 3):
    a, b = plain.get_batch(step), balanced.get_batch(step)
    assert sorted(map(bytes, a["inputs"])) == sorted(map(bytes, b["inputs"]))  # the same rows
    work = attention_work(b["segment_ids"])
    assert imbalance(work, 4) <= imbalance(attention_work(a["segment_ids"]), 4)
  # Deterministic, and processes take consecutive slices of the balanced order.
  assert_batches_equal(balanced.get_batch(3), make_dataset(cfg, vocab_size=512, balance_ranks=4).get_batch(3))
  halves = [make_dataset(cfg, vocab_size=512, balance_ranks=4, process_index=p, process_count=2).get_batch(3)
            for p in range(2)]
  assert_batches_equal({k: np.concatenate([h[k] for h in halves]) for k in halves[0]}, balanced.get_batch(3))
