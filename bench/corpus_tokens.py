"""Writes the built-in corpus as a uint16 token shard (byte tokens, EOS after each document).

The built-in corpus is this Python's standard library, which differs between Python versions;
a shard written once and read on both machines (`data.source=tokens`) gives CPU and GPU runs
the same data.

  PYTHONPATH=. python bench/corpus_tokens.py tokens.bin
"""

from __future__ import annotations

import sys

import numpy as np

from configs.base import DataConfig
from data.corpus import builtin_corpus
from data.packing import pack_documents
from data.tokenizer import ByteTokenizer


def main(path: str) -> None:
  ids = pack_documents(builtin_corpus(DataConfig().max_corpus_bytes), ByteTokenizer())
  ids.astype(np.uint16).tofile(path)
  print(f"wrote {len(ids):,} tokens to {path}")


if __name__ == "__main__":
  main(sys.argv[1])
