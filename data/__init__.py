"""Data: tokenizers, the built-in corpus, user sources, packing, and the per-process batch pipeline."""

from data.pipeline import Dataset, make_dataset
from data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = ["Dataset", "make_dataset", "load_tokenizer", "ByteTokenizer", "HFTokenizer", "Tokenizer"]
