"""Documents -> one token stream -> fixed-length training windows that know where documents end.

The stream is every document's tokens followed by EOS, back to back. Window i covers
`stream[i*L : i*L + L + 1]` (L = seq_len): inputs are its first L tokens, targets its last L, so
consecutive windows share one token and every stream token after the first is a target exactly once
(the tail that does not fill a whole window is dropped).

Inside a window, for t in [0, L):
  segment_ids[t] = 1 + number of EOS tokens in inputs[:t]
      (1-based; an EOS belongs to the document it ends, the token after it starts a new segment)
  positions[t]   = t - (first index of segment segment_ids[t])
      (restarts at 0 for every segment, including a document cut by the window start)
  loss_mask[t]   = 0.0 if inputs[t] == EOS else 1.0
      (the target after an EOS is the first token of the next document, which the model would have
       to predict from a different document; predicting EOS itself is kept, so models learn to stop)
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from data.tokenizer import Tokenizer


class TokenArray(Protocol):
  """A 1-D token sequence: a numpy array, a memmap, or anything that slices into a numpy array."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: slice) -> np.ndarray:
    ...


def pack_documents(docs: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
  """Encodes each document and appends EOS after it. Returns int32 [sum(len(doc tokens) + 1)]."""
  encode_batch = getattr(tokenizer, "encode_batch", None)
  encoded = encode_batch(list(docs)) if encode_batch else [tokenizer.encode(d) for d in docs]
  pieces = []
  for ids in encoded:
    pieces.append(np.asarray(ids, dtype=np.int32))
    pieces.append(np.array([tokenizer.eos_id], dtype=np.int32))
  return np.concatenate(pieces) if pieces else np.zeros([0], np.int32)


def window_features(window: np.ndarray, eos_id: int | None) -> dict[str, np.ndarray]:
  """Model features of one window of L + 1 tokens (see the module docstring for the rules).

  Returns int32 [L] `inputs`, `targets`, `segment_ids`, `positions` and float32 [L] `loss_mask`.
  `eos_id=None` means the stream has no document boundaries (one segment, nothing masked).
  """
  window = np.asarray(window).astype(np.int32)
  inputs, targets = window[:-1], window[1:]
  length = inputs.shape[0]
  if eos_id is None:
    is_eos = np.zeros([length], dtype=bool)
  else:
    is_eos = inputs == eos_id
  # A segment starts at t = 0 and right after every EOS input.
  starts = np.zeros([length], dtype=bool)
  starts[0] = True
  starts[1:] = is_eos[:-1]
  segment_ids = np.cumsum(starts, dtype=np.int32)
  index = np.arange(length, dtype=np.int32)
  segment_start = np.maximum.accumulate(np.where(starts, index, 0))
  return {
      "inputs": inputs,
      "targets": targets,
      "segment_ids": segment_ids,
      "positions": (index - segment_start).astype(np.int32),
      "loss_mask": (~is_eos).astype(np.float32),
  }


class PackedSequences:
  """Random access to the windows of `tokens[start:stop]`; item i is `window_features` of window i.

  `tokens` may be an in-memory array or memmapped shards: only the L + 1 tokens of one window are read
  per item, so a split is just a (start, stop) range and never copies the stream.
  """

  def __init__(self, tokens: TokenArray, seq_len: int, eos_id: int | None, *, start: int = 0,
               stop: int | None = None):
    if seq_len <= 0:
      raise ValueError(f"seq_len={seq_len}: must be positive")
    stop = len(tokens) if stop is None else stop
    if not 0 <= start <= stop <= len(tokens):
      raise ValueError(f"token range [{start}, {stop}) is not inside a stream of {len(tokens)} tokens")
    self.tokens, self.seq_len, self.eos_id = tokens, seq_len, eos_id
    self.start, self.stop = start, stop
    self._length = max(0, (stop - start - 1) // seq_len)

  @property
  def num_tokens(self) -> int:
    return self.stop - self.start

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < self._length:
      raise IndexError(f"window {index} out of range [0, {self._length})")
    begin = self.start + index * self.seq_len
    return window_features(self.tokens[begin:begin + self.seq_len + 1], self.eos_id)

  def __repr__(self) -> str:
    return (f"PackedSequences({self._length} windows of {self.seq_len} from tokens "
            f"[{self.start}, {self.stop}))")
