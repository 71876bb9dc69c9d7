"""Balancing attention work over data-parallel ranks (Zeppelin, ByteScale, FlexSP).

Packed windows differ in attention cost: a window holding one long document costs L^2 (causal:
half that), one holding many short documents far less. With rows dealt out in order, the rank
that gets the long documents sets every step's pace. `balance_rows` reorders the rows of a
global batch so that each rank's contiguous block of rows carries about the same work, the sum
over its rows of the squared document lengths. It is a pure function of the batch (ties broken
by row), so every process computes the same order and a resumed run the same batches.

Greedy longest-processing-time assignment with equal row counts: rows by decreasing work, each to
the least-loaded rank that still has room. This moves whole rows only; the tokens, their
targets and the summed loss are unchanged.
"""

from __future__ import annotations

import numpy as np


def attention_work(segment_ids_BxL: np.ndarray) -> np.ndarray:
  """float64 [B]: the sum over each row's segments (documents) of their squared lengths."""
  seg = np.asarray(segment_ids_BxL)
  b, length = seg.shape
  starts = np.ones((b, length), bool)
  starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
  # Segment lengths: distances between consecutive starts (and the row's end).
  work = np.zeros(b)
  for r in range(b):
    edges = np.append(np.flatnonzero(starts[r]), length)
    work[r] = float(np.sum(np.diff(edges).astype(np.float64) ** 2))
  return work


def balance_rows(work_B: np.ndarray, n_ranks: int) -> np.ndarray:
  """int [B]: an order of the rows such that rank r's rows order[r*B/R:(r+1)*B/R] carry about
  equal total work. B must be divisible by n_ranks."""
  work = np.asarray(work_B, np.float64)
  b = work.shape[0]
  if n_ranks <= 0 or b % n_ranks:
    raise ValueError(f"{b} rows do not split over {n_ranks} ranks")
  per_rank = b // n_ranks
  load, slots = np.zeros(n_ranks), [[] for _ in range(n_ranks)]
  for row in np.lexsort((np.arange(b), -work)):  # by decreasing work, then by row
    open_ranks = [r for r in range(n_ranks) if len(slots[r]) < per_rank]
    r = min(open_ranks, key=lambda i: (load[i], i))
    slots[r].append(int(row))
    load[r] += work[row]
  return np.concatenate([np.sort(s) for s in slots]).astype(np.int64)


def imbalance(work_B: np.ndarray, n_ranks: int, order: np.ndarray | None = None) -> float:
  """max / mean of the ranks' total work when rank r takes rows order[r*B/R:(r+1)*B/R]."""
  work = np.asarray(work_B, np.float64)
  if order is not None:
    work = work[order]
  per_rank = work.reshape(n_ranks, -1).sum(axis=1)
  return float(per_rank.max() / per_rank.mean())
