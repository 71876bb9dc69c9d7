"""User sources and tokenizers: memmapped token shards, text/JSONL with a tokenizer.json, the
built-in corpus and the byte tokenizer, and their errors (each naming the file)."""

import json

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from configs import ConfigError
from data import ByteTokenizer, HFTokenizer, load_tokenizer, make_dataset
from data.corpus import builtin_corpus, stdlib_files
from data.sources import ShardedTokens
from tests.data.common import EOS, epoch_rows, small


def test_builtin_corpus_is_deterministic_and_capped():
  docs = builtin_corpus(30_000)
  assert docs and docs == builtin_corpus(30_000)
  assert sum(len(d.encode("utf-8")) for d in docs) == 30_000
  bigger = builtin_corpus(50_000)
  assert bigger[:len(docs) - 1] == docs[:-1]  # same order; only the cut last document differs
  rel = [r for r, _ in stdlib_files()]
  assert rel == sorted(rel)
  assert not any(part in ("test", "tests", "idlelib", "site-packages") for r in rel for part in r.split("/"))


def test_byte_tokenizer_roundtrips():
  tok = load_tokenizer("bytes")
  assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 257 and tok.eos_id == 256
  text = "def f(x):\n  return 'héllo ✓ 数据'\n"
  ids = tok.encode(text)
  assert max(ids) < 256 and tok.decode(ids) == text
  assert tok.decode(ids + [tok.eos_id]) == text
  for doc in builtin_corpus(20_000):
    assert tok.decode(tok.encode(doc)) == doc


def write_tokens(path, values, dtype):
  np.asarray(values, dtype=dtype).tofile(path)
  return str(path)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_shards_are_memmapped_and_concatenated(tmp_path, dtype):
  big = 70_000 if dtype == "uint32" else 300  # uint32 shards hold ids a uint16 cannot
  a = np.arange(100) % 50
  b = np.concatenate([np.arange(80) + big, [EOS]])
  b[40] = EOS
  paths = (write_tokens(tmp_path / "a.bin", a, dtype), write_tokens(tmp_path / "b.bin", b, dtype))
  stream = ShardedTokens(paths, dtype)
  assert all(isinstance(s, np.memmap) for s in stream.shards) and len(stream) == 181
  full = np.concatenate([a, b])
  np.testing.assert_array_equal(stream[90:130], full[90:130])  # across the shard boundary
  assert stream.max_id() == (big + 79, paths[1])

  cfg = small(source="tokens", paths=paths, token_dtype=dtype, seq_len=10, global_batch=2, val_fraction=0.2)
  val = make_dataset(cfg, vocab_size=big + 80, split="validation")
  assert val.num_sequences == (36 - 1) // 10  # the last int(181 * 0.2) = 36 tokens
  got = val.get_batch(0)
  np.testing.assert_array_equal(got["inputs"], full[145:165].reshape(2, 10))
  np.testing.assert_array_equal(got["loss_mask"], (full[145:165] != EOS).reshape(2, 10))
  train = make_dataset(cfg, vocab_size=big + 80)
  assert train.num_sequences == (145 - 1) // 10
  with pytest.raises(ValueError, match=f"token id {big + 79} >= model vocab_size {big + 79}"):
    make_dataset(cfg, vocab_size=big + 79)


def test_token_shard_errors(tmp_path):
  odd = tmp_path / "odd.bin"
  odd.write_bytes(b"\x01\x00\x02")
  with pytest.raises(ValueError, match="not a whole number of uint16 tokens"):
    ShardedTokens([str(odd)], "uint16")
  with pytest.raises(FileNotFoundError, match="missing.bin"):
    ShardedTokens([str(tmp_path / "missing.bin")], "uint16")
  empty = tmp_path / "empty.bin"
  empty.write_bytes(b"")
  with pytest.raises(ValueError, match="hold no tokens"):
    ShardedTokens([str(empty)], "uint32")


def build_wordlevel_tokenizer(path, special=("[UNK]", "</s>")):
  tok = tokenizers.Tokenizer(models.WordLevel(unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  corpus = ["the cat sat on the mat", "a dog ran in the park", "birds fly over the sea"]
  tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=list(special)))
  tok.save(str(path))
  return str(path)


def test_text_and_jsonl_with_a_tokenizer_json(tmp_path):
  tok_path = build_wordlevel_tokenizer(tmp_path / "tokenizer.json")
  (tmp_path / "a.txt").write_text("the cat sat on the mat " * 30)
  lines = [{"text": "a dog ran in the park " * 8}, {"body": "x", "text": "birds fly over the sea " * 8},
           {"text": ""}, {"text": "the dog sat " * 10}]
  (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n\n")
  paths = (str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"))
  cfg = small(source="text", paths=paths, tokenizer=tok_path, seq_len=8, global_batch=2, val_fraction=0.25)
  tok = load_tokenizer(tok_path)
  assert isinstance(tok, HFTokenizer) and tok.eos_id == 1 and tok.vocab_size == 16  # 14 words + [UNK] + </s>

  train = make_dataset(cfg, vocab_size=32)
  assert isinstance(train.tokenizer, HFTokenizer)
  batch = train.get_batch(0)
  assert batch["inputs"].max() < tok.vocab_size and (batch["inputs"] != 0).all()  # no unknown words
  val = make_dataset(cfg, vocab_size=32, split="validation")
  # 4 documents (the empty one is dropped); the last of them, "the dog sat ...", is validation.
  text = tok.decode(np.concatenate([r["inputs"] for r in epoch_rows(val, val.num_sequences)]))
  assert set(text.split()) == {"the", "dog", "sat"}
  assert val.num_sequences == (31 - 1) // 8

  (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: no field 'text'"):
    make_dataset(small(source="text", paths=(str(tmp_path / "bad.jsonl"),)), vocab_size=512)


def test_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such tokenizer file"):
    load_tokenizer(str(tmp_path / "nope.json"))
  path = build_wordlevel_tokenizer(tmp_path / "noeos.json", special=("[UNK]",))
  with pytest.raises(ValueError, match="noeos.json has none of the end-of-text tokens"):
    HFTokenizer(path)


def test_tokenizer_file_that_does_not_parse_names_the_file(tmp_path):
  bad = tmp_path / "tokenizer.json"
  bad.write_text('{"version": "1.0", "model": {"type": "NoSuchModel"}}')
  with pytest.raises(ConfigError, match=rf"tokenizer file {bad} could not be parsed"):
    load_tokenizer(str(bad))
