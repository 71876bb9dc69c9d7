"""`make_dataset`: a config and a split -> deterministic, random-access batches for one process.

Row r of global batch `step` is element `step * global_batch + r` of an endless Grain dataset:
the packed windows, shuffled globally with `data.seed` (a fresh permutation per epoch, train only)
and repeated. Process p of P reads rows [p*B/P, (p+1)*B/P) of it, so a batch depends only on
(config, split, step): resuming from a step number reproduces the data exactly.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import grain
import numpy as np

from configs.base import DATA_SOURCES, DataConfig
from configs.errors import ConfigError
from data.balance import attention_work, balance_rows
from data.corpus import builtin_corpus
from data.packing import PackedSequences, pack_documents
from data.sources import ShardedTokens, SyntheticSequences, read_documents
from data.tokenizer import Tokenizer, load_tokenizer

SPLITS = ("train", "validation")


class Dataset:
  """This process's batches of one split.

  `get_batch(step)` returns a dict of arrays with leading shape [B/P, seq_len]:
  int32 `inputs`, `targets`, `segment_ids`, `positions` and float32 `loss_mask`
  (see data/packing.py for the segment rules). Iterating yields `get_batch(step)` for
  step = 0, 1, ... from an internal counter saved by `get_state` and restored by `set_state`.
  """

  def __init__(self, examples: grain.MapDataset, *, config: DataConfig, split: str, process_index: int,
               process_count: int, tokenizer: Tokenizer | None, num_sequences: int | None, balance_ranks: int = 0):
    self.config, self.split = config, split
    self.process_index, self.process_count = process_index, process_count
    self.global_batch, self.seq_len = config.global_batch, config.seq_len
    self.local_batch = config.global_batch // process_count
    self.tokenizer = tokenizer
    self.num_sequences = num_sequences  # windows in one epoch of this split; None when endless
    self.balance_ranks = balance_ranks
    if balance_ranks:  # every process reads the whole global batch to order its rows
      self._batches = examples.batch(self.global_batch, drop_remainder=True)
    else:  # batch k holds rows [k*b, (k+1)*b), so global step s on process p is batch s*P + p
      self._batches = examples.batch(self.local_batch, drop_remainder=True)
    self.step = 0

  def get_batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of global batch `step`; each array is [global_batch / P, seq_len].

    With `balance_ranks` R, the global batch's rows are first ordered so that each of the R
    contiguous blocks of rows (one per data-parallel rank) carries about equal attention work
    (`data.balance`).
    """
    step = int(step)
    if step < 0:
      raise ValueError(f"step={step}: must be >= 0")
    if not self.balance_ranks:
      return self._batches[step * self.process_count + self.process_index]
    batch = self._batches[step]
    order = balance_rows(attention_work(batch["segment_ids"]), self.balance_ranks)
    mine = order[self.process_index * self.local_batch:(self.process_index + 1) * self.local_batch]
    return {k: v[mine] for k, v in batch.items()}

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.get_batch(self.step)
    self.step += 1
    return batch

  def get_state(self) -> dict:
    """JSON-serialisable position: the next step `__next__` will return."""
    return {"step": self.step}

  def set_state(self, state: dict) -> None:
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or step < 0:
      raise ValueError(f"data state {state!r}: expected {{'step': non-negative int}}")
    self.step = step

  def __repr__(self) -> str:
    return (f"Dataset(source={self.config.source!r}, split={self.split!r}, sequences={self.num_sequences}, "
            f"batch={self.local_batch}x{self.seq_len}, process {self.process_index}/{self.process_count})")


def split_documents(docs: Sequence[str], val_fraction: float, split: str) -> list[str]:
  """The last `val_fraction` of documents (at least one if val_fraction > 0) are validation."""
  n_val = max(1, round(len(docs) * val_fraction)) if val_fraction > 0 else 0
  if split == "validation" and n_val == 0:
    raise ConfigError("split 'validation' is empty because data.val_fraction=0")
  if n_val >= len(docs):
    raise ConfigError(f"only {len(docs)} document(s): holding out {n_val} for validation "
                     f"(data.val_fraction={val_fraction}) leaves none to train on; add documents or "
                     f"set data.val_fraction=0")
  return list(docs[len(docs) - n_val:]) if split == "validation" else list(docs[:len(docs) - n_val])


def _check_tokenizer(tokenizer: Tokenizer, spec: str, vocab_size: int) -> None:
  if tokenizer.vocab_size > vocab_size:
    raise ConfigError(f"tokenizer {spec!r} has vocab_size {tokenizer.vocab_size} > model vocab_size "
                     f"{vocab_size}; raise model.vocab_size to at least {tokenizer.vocab_size}")


def _packed_split(config: DataConfig, vocab_size: int, split: str) -> tuple[PackedSequences, Tokenizer]:
  """Windows of one split for the sources that have documents or a token stream."""
  tokenizer = load_tokenizer(config.tokenizer)
  _check_tokenizer(tokenizer, config.tokenizer, vocab_size)
  if config.source == "tokens":
    # Boundaries are the EOS ids already in the shards, so the tokenizer only supplies `eos_id`.
    stream = ShardedTokens(config.paths, config.token_dtype)
    stream.check_vocab(vocab_size)
    n_val = int(len(stream) * config.val_fraction)
    if split == "validation" and n_val == 0:
      raise ConfigError(f"split 'validation' is empty: data.val_fraction={config.val_fraction} of "
                       f"{len(stream)} tokens is no tokens")
    cut = len(stream) - n_val
    start, stop = (cut, len(stream)) if split == "validation" else (0, cut)
    return PackedSequences(stream, config.seq_len, tokenizer.eos_id, start=start, stop=stop), tokenizer
  if config.source == "builtin":
    docs = builtin_corpus(config.max_corpus_bytes)
  else:
    docs = read_documents(config.paths, config.jsonl_field)
  tokens = pack_documents(split_documents(docs, config.val_fraction, split), tokenizer)
  return PackedSequences(tokens, config.seq_len, tokenizer.eos_id), tokenizer


def make_dataset(config: DataConfig, *, vocab_size: int, split: str = "train", process_index: int = 0,
                 process_count: int = 1, balance_ranks: int = 0) -> Dataset:
  """Builds this process's view of one split; see `Dataset` for the batch layout.

  `balance_ranks`: order each global batch's rows for equal attention work over that many
  data-parallel ranks (0: rows in order).

  `vocab_size` is the model's: every token id must be below it. Raises `ConfigError` (a
  ValueError; `MissingFileError`, also a FileNotFoundError, for missing files) with a message
  naming the offending setting or file.
  """
  if split not in SPLITS:
    raise ConfigError(f"split={split!r}: choose one of {SPLITS}")
  if config.source not in DATA_SOURCES:
    raise ConfigError(f"data.source={config.source!r}: choose one of {DATA_SOURCES}")
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ConfigError(f"process_index={process_index}, process_count={process_count}: need "
                     f"0 <= process_index < process_count")
  if config.global_batch <= 0 or config.global_batch % process_count:
    raise ConfigError(f"data.global_batch={config.global_batch} is not divisible by process_count="
                     f"{process_count}; every process must hold the same number of rows")
  if config.seq_len <= 0:
    raise ConfigError(f"data.seq_len={config.seq_len}: must be positive")
  if balance_ranks and config.global_batch % balance_ranks:
    raise ConfigError(f"data.global_batch={config.global_batch} does not split over {balance_ranks} data-parallel "
                      f"ranks for balancing")
  common = dict(config=config, split=split, process_index=process_index, process_count=process_count,
                balance_ranks=balance_ranks)

  if config.source == "synthetic":
    # Distinct Philox streams keep train and validation apart; the data is endless, so no epochs.
    examples = grain.MapDataset.source(
        SyntheticSequences(vocab_size, config.seq_len, config.seed, stream=SPLITS.index(split)))
    return Dataset(examples, tokenizer=None, num_sequences=None, **common)

  sequences, tokenizer = _packed_split(config, vocab_size, split)
  if len(sequences) < config.global_batch:
    need = config.global_batch * config.seq_len + 1
    raise ConfigError(f"split {split!r} of data.source={config.source!r} has {len(sequences)} sequences "
                     f"({sequences.num_tokens} tokens), fewer than one global batch of "
                     f"{config.global_batch}; it needs at least {need} tokens "
                     f"(global_batch * seq_len + 1)")
  examples = grain.MapDataset.source(sequences)
  if split == "train":
    # Shuffle before repeat: each epoch is a full permutation, reseeded per epoch by Grain.
    examples = examples.shuffle(seed=config.seed % 2**32)
  return Dataset(examples.repeat(), tokenizer=tokenizer, num_sequences=len(sequences), **common)
