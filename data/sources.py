"""User data: text/JSONL documents, memmapped pre-tokenized shards, and synthetic tokens.

Each source checks its inputs up front and fails with a message naming the file and the problem,
so a bad path or a wrong dtype shows up before any training step.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

import numpy as np

from configs.errors import ConfigError, MissingFileError

from data.packing import window_features

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)
_MAX_CHUNK = 1 << 26  # tokens per read when scanning a shard for its largest id


def _require_file(path: str) -> None:
  if not os.path.isfile(path):
    raise MissingFileError(f"data file not found: {path}")


def _read_jsonl(path: str, field: str) -> list[str]:
  docs = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
      if not isinstance(record, dict) or field not in record:
        raise ConfigError(f"{path}:{line_no}: no field {field!r} (set data.jsonl_field)")
      text = record[field]
      if not isinstance(text, str):
        raise ConfigError(f"{path}:{line_no}: field {field!r} is {type(text).__name__}, expected a string")
      docs.append(text)
  return docs


def read_documents(paths: Sequence[str], jsonl_field: str = "text") -> list[str]:
  """Documents from `.txt` files (one file, one document) and `.jsonl` files (one per line).

  Files are read in the order given; empty documents are dropped. Returns a list of str.
  """
  if not paths:
    raise ConfigError("data.paths is empty: source 'text' needs .txt or .jsonl files")
  docs: list[str] = []
  for path in paths:
    _require_file(path)
    if path.endswith(JSONL_SUFFIXES):
      docs.extend(_read_jsonl(path, jsonl_field))
    elif path.endswith(TEXT_SUFFIXES):
      with open(path, encoding="utf-8") as f:
        docs.append(f.read())
    else:
      raise ConfigError(f"{path}: unsupported file type; source 'text' reads {TEXT_SUFFIXES + JSONL_SUFFIXES}")
  docs = [d for d in docs if d]
  if not docs:
    raise ConfigError(f"the text corpus is empty: no non-empty documents in {list(paths)}")
  return docs


class ShardedTokens:
  """Raw token files (uint16 or uint32, native byte order) memmapped and read as one stream.

  Nothing is loaded up front: slicing reads only the requested range, across shard boundaries.
  """

  def __init__(self, paths: Sequence[str], dtype: str = "uint16"):
    if dtype not in ("uint16", "uint32"):
      raise ConfigError(f"data.token_dtype={dtype!r}: choose uint16 or uint32")
    if not paths:
      raise ConfigError("data.paths is empty: source 'tokens' needs token shard files")
    self.dtype = np.dtype(dtype)
    self.paths, self.shards = [], []
    for path in paths:
      _require_file(path)
      size = os.path.getsize(path)
      if size % self.dtype.itemsize:
        raise ConfigError(f"{path}: {size} bytes is not a whole number of {dtype} tokens; "
                         f"is data.token_dtype right?")
      if size == 0:
        continue  # numpy cannot map an empty file, and it adds no tokens
      self.paths.append(path)
      self.shards.append(np.memmap(path, dtype=self.dtype, mode="r"))
    if not self.shards:
      raise ConfigError(f"the token shards hold no tokens: {list(paths)}")
    # offsets[k] is the stream index of shard k's first token; offsets[-1] is the total.
    self.offsets = np.cumsum([0] + [len(s) for s in self.shards])

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __getitem__(self, index: slice) -> np.ndarray:
    """Tokens [start, stop) as a fresh array of the shard dtype; only slices with step 1."""
    if not isinstance(index, slice) or index.step not in (None, 1):
      raise TypeError("ShardedTokens supports only contiguous slices")
    start, stop, _ = index.indices(len(self))
    pieces = []
    shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
    while start < stop:
      base = int(self.offsets[shard])
      end = min(stop, int(self.offsets[shard + 1]))
      pieces.append(np.asarray(self.shards[shard][start - base:end - base]))
      start, shard = end, shard + 1
    return np.concatenate(pieces) if pieces else np.zeros([0], self.dtype)

  def max_id(self) -> tuple[int, str]:
    """(largest token id, the file it is in), scanning each memmap in bounded chunks."""
    best, where = -1, self.paths[0]
    for path, shard in zip(self.paths, self.shards):
      for begin in range(0, len(shard), _MAX_CHUNK):
        value = int(shard[begin:begin + _MAX_CHUNK].max())
        if value > best:
          best, where = value, path
    return best, where

  def check_vocab(self, vocab_size: int) -> None:
    """Raises if any id could index past the model's embedding table."""
    largest, path = self.max_id()
    if largest >= vocab_size:
      raise ConfigError(f"{path}: token id {largest} >= model vocab_size {vocab_size}; the shards were "
                       f"made with a larger vocabulary (or data.token_dtype is wrong)")


class SyntheticSequences:
  """Uniform random token windows for benchmarks; window i is a pure function of (seed, stream, i).

  Each window draws from a Philox generator keyed by (seed, stream) whose counter starts at i, so
  windows are independent of one another and of the order they are asked for. No document
  boundaries: one segment per window, nothing masked. `stream` keeps splits apart.
  """

  def __init__(self, vocab_size: int, seq_len: int, seed: int, stream: int = 0):
    if vocab_size <= 0 or seq_len <= 0:
      raise ConfigError(f"vocab_size={vocab_size}, seq_len={seq_len}: must be positive")
    self.vocab_size, self.seq_len = vocab_size, seq_len
    self._key = np.array([seed % 2**64, stream], dtype=np.uint64)

  def __len__(self) -> int:
    return sys.maxsize  # endless; Grain reads it as an infinite dataset

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    # The window index sits in counter word 2: one window's draws only advance word 0, so the
    # streams of different windows can never overlap.
    counter = np.array([0, 0, int(index), 0], dtype=np.uint64)
    rng = np.random.Generator(np.random.Philox(key=self._key, counter=counter))
    window = rng.integers(0, self.vocab_size, size=self.seq_len + 1, dtype=np.int32)
    return window_features(window, eos_id=None)
