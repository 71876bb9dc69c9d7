"""Tokenizers behind one small interface: bytes (no files needed) or a Hugging Face tokenizer.json.

Every tokenizer exposes `vocab_size`, `eos_id`, `encode(text) -> list[int]` (no EOS appended) and
`decode(ids) -> str`. Packing appends `eos_id` after each document; it is the only special token the
data pipeline relies on.
"""

from __future__ import annotations

import os
from typing import Iterable, Protocol, runtime_checkable

from configs.errors import ConfigError, MissingFileError

# Tried in order; the first one present in the vocabulary is the document separator.
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")


@runtime_checkable
class Tokenizer(Protocol):
  vocab_size: int
  eos_id: int

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without an EOS appended."""
    ...

  def decode(self, ids: Iterable[int]) -> str:
    ...


class ByteTokenizer:
  """UTF-8 bytes as tokens: ids 0..255 are the byte values, 256 is EOS, so `vocab_size` is 257.

  Lossless for any text, needs no vocabulary file, and keeps the embedding tiny.
  """

  vocab_size: int = 257
  eos_id: int = 256

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Iterable[int]) -> str:
    # EOS (and any id outside the byte range) has no text; a cut multi-byte character becomes U+FFFD.
    data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
    return data.decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer()"


class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer loaded from a tokenizer.json file.

  `vocab_size` counts added (special) tokens too, so every id the tokenizer can produce is
  < `vocab_size`. `eos_id` is the first of `EOS_CANDIDATES` found in the vocabulary.
  """

  def __init__(self, path: str):
    import tokenizers  # deferred: the byte tokenizer must work without it

    if not os.path.isfile(path):
      raise MissingFileError(f"tokenizer file not found: {path}")
    self.path = path
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as err:  # the Rust side raises its own exception type
      raise ConfigError(f"tokenizer file {path} could not be parsed as a Hugging Face tokenizer.json: "
                        f"{err}") from None
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    for token in EOS_CANDIDATES:
      token_id = self._tok.token_to_id(token)
      if token_id is not None:
        self.eos_token, self.eos_id = token, int(token_id)
        break
    else:
      raise ConfigError(f"tokenizer {path} has none of the end-of-text tokens {EOS_CANDIDATES}; "
                       f"add one of them as a special token so documents can be separated")

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """`encode` over many texts at once; the Rust side runs them in parallel."""
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def __repr__(self) -> str:
    return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, eos={self.eos_token!r})"


def load_tokenizer(spec: str) -> Tokenizer:
  """"bytes" -> `ByteTokenizer`; anything else is a path to a tokenizer.json (or a folder holding one)."""
  if spec == "bytes":
    return ByteTokenizer()
  path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
  if not os.path.isfile(path):
    raise MissingFileError(f"data.tokenizer={spec!r}: no such tokenizer file ({path}); use 'bytes' or "
                            f"the path to a Hugging Face tokenizer.json")
  return HFTokenizer(path)
