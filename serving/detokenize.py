"""Incremental detokenisation and stop strings, for streaming text one token at a time.

Decoding each new token alone is wrong for byte-level and SentencePiece vocabularies: a UTF-8
character can span tokens, and a word-initial space depends on the previous token. The usual fix
(vLLM's, after Hugging Face TGI) decodes a short window twice, with and without the new tokens,
and emits the difference once it no longer ends in U+FFFD (an incomplete character).

Stop strings are matched on the text; the text from the first stop string to complete is dropped. While
streaming, a tail that could still become a stop string is held back until it cannot.
"""

from __future__ import annotations

from typing import Sequence

from data.tokenizer import Tokenizer

CONTEXT_TOKENS = 5  # prompt tokens decoded ahead of the output, for word-initial spaces


class IncrementalDetokenizer:
  """Turns a growing list of token ids into text deltas."""

  def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int]):
    self._tok = tokenizer
    self._ids = list(prompt_ids[-CONTEXT_TOKENS:])
    self._prefix = 0  # window start
    self._read = len(self._ids)  # ids before this are already emitted

  def push(self, token_ids: Sequence[int]) -> str:
    """The new text that `token_ids` complete (may be "" while a character is incomplete)."""
    self._ids.extend(int(t) for t in token_ids)
    before = self._tok.decode(self._ids[self._prefix:self._read])
    after = self._tok.decode(self._ids[self._prefix:])
    if len(after) > len(before) and not after.endswith("\ufffd"):
      self._prefix, self._read = self._read, len(self._ids)
      return after[len(before):]
    return ""

  def flush(self) -> str:
    """Whatever is left at the end, incomplete characters included (as U+FFFD)."""
    before = self._tok.decode(self._ids[self._prefix:self._read])
    after = self._tok.decode(self._ids[self._prefix:])
    self._prefix = self._read = len(self._ids)
    return after[len(before):]


class StopStringMatcher:
  """Accumulates text, cuts it at the first stop string, and says how much is safe to emit."""

  def __init__(self, stops: Sequence[str]):
    self.stops = tuple(stops)
    self.text = ""
    self.stopped = False
    self._longest = max((len(s) for s in self.stops), default=0)

  def add(self, delta: str) -> None:
    if self.stopped or not delta:
      return
    start = max(0, len(self.text) - self._longest + 1)  # a match must end inside the new text
    self.text += delta
    # The stop string that completes first (as if the text came one character at a time), and of
    # those ending at the same place the longest, so the cut does not depend on how tokens group.
    hits = [(i + len(s), i) for s, i in ((s, self.text.find(s, start)) for s in self.stops) if i >= 0]
    if hits:
      self.text = self.text[:min(hits)[1]]
      self.stopped = True

  def safe_length(self) -> int:
    """Length of the prefix that no later text can turn into part of a stop string."""
    if self.stopped:
      return len(self.text)
    for k in range(min(self._longest - 1, len(self.text)), 0, -1):
      tail = self.text[-k:]
      if any(s.startswith(tail) for s in self.stops):
        return len(self.text) - k
    return len(self.text)
