"""Shared by the data tests: a small data config and batch comparisons."""

import numpy as np

from configs.base import DataConfig

EOS = 256
KEYS = {"inputs": np.int32, "targets": np.int32, "segment_ids": np.int32, "positions": np.int32,
        "loss_mask": np.float32}


def small(**kw) -> DataConfig:
  base = dict(max_corpus_bytes=60_000, seq_len=32, global_batch=8, val_fraction=0.1, seed=3)
  base.update(kw)
  return DataConfig(**base)


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def epoch_rows(ds, n):
  """The first n rows (one process, in order) of `ds`, as a list of per-row dicts."""
  rows, step = [], 0
  while len(rows) < n:
    batch = ds.get_batch(step)
    rows += [{k: v[r] for k, v in batch.items()} for r in range(ds.local_batch)]
    step += 1
  return rows[:n]
