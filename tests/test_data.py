"""Data pipeline: determinism, resumption, process slicing, packing rules, sources and their errors."""

import json

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from configs.base import DataConfig
from data import ByteTokenizer, HFTokenizer, load_tokenizer, make_dataset
from data.corpus import builtin_corpus, stdlib_files
from data.packing import PackedSequences, pack_documents
from data.pipeline import split_documents
from data.sources import ShardedTokens

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


# Determinism, resumption, process slicing.


@pytest.mark.parametrize("source", ["builtin", "synthetic"])
def test_batches_have_documented_shapes_and_are_deterministic(source):
  cfg = small(source=source)
  a, b = make_dataset(cfg, vocab_size=512), make_dataset(cfg, vocab_size=512)
  batch = a.get_batch(4)
  assert {k: v.dtype for k, v in batch.items()} == KEYS
  assert all(v.shape == (8, 32) for v in batch.values())
  assert_batches_equal(batch, b.get_batch(4))
  assert_batches_equal(batch, a.get_batch(4))  # random access: asking again changes nothing
  assert not np.array_equal(batch["inputs"], a.get_batch(5)["inputs"])
  np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])


def test_resume_from_saved_state_continues_exactly():
  cfg = small()
  first = make_dataset(cfg, vocab_size=512)
  for _ in range(7):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  assert state == {"step": 7}
  resumed = make_dataset(cfg, vocab_size=512)
  resumed.set_state(state)
  for _ in range(3):
    assert_batches_equal(next(resumed), next(first))
  with pytest.raises(ValueError, match="expected"):
    resumed.set_state({"step": -1})


@pytest.mark.parametrize("source", ["builtin", "synthetic"])
def test_processes_hold_consecutive_slices_of_the_global_batch(source):
  cfg = small(source=source)
  whole = make_dataset(cfg, vocab_size=512)
  parts = [make_dataset(cfg, vocab_size=512, process_index=p, process_count=2) for p in range(2)]
  for step in (0, 1, 13):
    local = [p.get_batch(step) for p in parts]
    assert local[0]["inputs"].shape == (4, 32)
    joined = {k: np.concatenate([l[k] for l in local]) for k in local[0]}
    assert_batches_equal(joined, whole.get_batch(step))


# Packing.


def doc_ids(stream):
  """Document index of each stream position, EOS counted with the document it ends."""
  is_eos = stream == EOS
  return np.concatenate([[0], np.cumsum(is_eos)[:-1]])


def test_window_features_on_a_hand_built_stream():
  # Documents: [1 2 3], [4 5], [6], [7 8 9 10], [11 12] (each followed by EOS).
  stream = pack_documents(["\x01\x02\x03", "\x04\x05", "\x06", "\x07\x08\x09\x0a", "\x0b\x0c"],
                          ByteTokenizer())
  np.testing.assert_array_equal(stream, [1, 2, 3, EOS, 4, 5, EOS, 6, EOS, 7, 8, 9, 10, EOS, 11, 12, EOS])
  w = PackedSequences(stream, seq_len=6, eos_id=EOS)
  assert len(w) == 2  # (17 - 1) // 6; the last 4 tokens never become targets
  # Window 1 = stream[6:13]: inputs EOS 6 EOS 7 8 9 (the first EOS ends a document cut by the window).
  got = w[1]
  np.testing.assert_array_equal(got["inputs"], [EOS, 6, EOS, 7, 8, 9])
  np.testing.assert_array_equal(got["targets"], [6, EOS, 7, 8, 9, 10])
  np.testing.assert_array_equal(got["segment_ids"], [1, 2, 2, 3, 3, 3])
  np.testing.assert_array_equal(got["positions"], [0, 0, 1, 0, 1, 2])
  np.testing.assert_array_equal(got["loss_mask"], [0, 1, 0, 1, 1, 1])


@pytest.mark.parametrize("seq_len", [1, 3, 5, 16])
def test_windows_never_cross_documents(seq_len):
  rng = np.random.default_rng(0)
  docs = ["x" * int(n) for n in rng.integers(1, 12, size=40)]
  stream = pack_documents(docs, ByteTokenizer())
  doc = doc_ids(stream)
  packed = PackedSequences(stream, seq_len, EOS)
  for i in range(len(packed)):
    f, begin = packed[i], i * seq_len
    seg, pos, x = f["segment_ids"], f["positions"], f["inputs"]
    new_segment = np.concatenate([[True], seg[1:] != seg[:-1]])
    assert seg[0] == 1 and np.all(np.diff(seg) >= 0)
    np.testing.assert_array_equal(pos == 0, new_segment)  # positions restart exactly at segment changes
    np.testing.assert_array_equal(pos[~new_segment], pos[np.flatnonzero(~new_segment) - 1] + 1)
    np.testing.assert_array_equal(f["loss_mask"], (x != EOS).astype(np.float32))
    # Same segment <=> same document, and loss only where input and target share a document.
    d_in, d_tgt = doc[begin:begin + seq_len], doc[begin + 1:begin + seq_len + 1]
    np.testing.assert_array_equal(seg[:, None] == seg[None, :], d_in[:, None] == d_in[None, :])
    np.testing.assert_array_equal(f["loss_mask"] == 1, d_in == d_tgt)


def test_every_token_is_a_target_exactly_once():
  stream = pack_documents(["abc", "defgh", "ij", "klmnopq", "r"], ByteTokenizer())
  packed = PackedSequences(stream, seq_len=4, eos_id=EOS)
  targets = np.concatenate([packed[i]["targets"] for i in range(len(packed))])
  np.testing.assert_array_equal(targets, stream[1:len(packed) * 4 + 1])
  inputs = np.concatenate([packed[i]["inputs"] for i in range(len(packed))])
  np.testing.assert_array_equal(inputs, stream[:len(packed) * 4])


def test_unshuffled_split_is_the_stream_and_shuffled_epoch_is_a_permutation(tmp_path):
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": f"document number {i} " * (i % 5 + 1)}) + "\n"
                          for i in range(60)))
  cfg = small(source="text", paths=(str(path),), seq_len=16, global_batch=4)
  val = make_dataset(cfg, vocab_size=512, split="validation")
  docs = [json.loads(line)["text"] for line in path.read_text().splitlines()]
  stream = pack_documents(split_documents(docs, 0.1, "validation"), ByteTokenizer())
  rows = epoch_rows(val, val.num_sequences)
  targets = np.concatenate([r["targets"] for r in rows])
  np.testing.assert_array_equal(targets, stream[1:val.num_sequences * 16 + 1])

  train = make_dataset(cfg, vocab_size=512)
  shuffled = [r["inputs"].tobytes() for r in epoch_rows(train, train.num_sequences)]
  plain = PackedSequences(pack_documents(split_documents(docs, 0.1, "train"), ByteTokenizer()), 16, EOS)
  # Same multiset of windows (each exactly once), in a different order.
  assert sorted(shuffled) == sorted(plain[i]["inputs"].tobytes() for i in range(len(plain)))
  assert shuffled != [plain[i]["inputs"].tobytes() for i in range(len(plain))]


# Splits.


def test_train_and_validation_documents_are_disjoint(tmp_path):
  paths = []
  for k in range(20):  # document k is one letter repeated, so every byte names its document
    p = tmp_path / f"{k:02d}.txt"
    p.write_text(chr(ord("a") + k) * 90)
    paths.append(str(p))
  cfg = small(source="text", paths=tuple(paths), seq_len=8, global_batch=4, val_fraction=0.1)
  seen = {}
  for split in ("train", "validation"):
    ds = make_dataset(cfg, vocab_size=512, split=split)
    x = np.concatenate([r["inputs"] for r in epoch_rows(ds, ds.num_sequences)])
    seen[split] = set(x[x != EOS].tolist())
  assert seen["validation"] == {ord("s"), ord("t")}  # the last 10% of documents
  assert seen["train"].isdisjoint(seen["validation"])
  assert len(seen["train"]) == 18

  docs = builtin_corpus(50_000)
  train, val = split_documents(docs, 0.1, "train"), split_documents(docs, 0.1, "validation")
  assert train + val == docs and len(val) >= 1 and not set(train) & set(val)


# Built-in corpus and byte tokenizer.


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


# User sources.


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


# Configuration errors.


def test_pipeline_errors(tmp_path):
  with pytest.raises(ValueError, match="vocab_size 257 > model vocab_size 256"):
    make_dataset(small(), vocab_size=256)
  with pytest.raises(ValueError, match="not divisible by process_count=3"):
    make_dataset(small(), vocab_size=512, process_count=3, process_index=0)
  with pytest.raises(ValueError, match=r"fewer than one global batch of 8; it needs at least 8193 tokens"):
    make_dataset(small(seq_len=1024), vocab_size=512, split="validation")
  with pytest.raises(ValueError, match="split 'validation' is empty because data.val_fraction=0"):
    make_dataset(small(val_fraction=0.0), vocab_size=512, split="validation")
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ValueError, match="text corpus is empty"):
    make_dataset(small(source="text", paths=(str(tmp_path / "empty.txt"),)), vocab_size=512)
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    make_dataset(small(source="text", paths=(str(tmp_path / "missing.txt"),)), vocab_size=512)
  (tmp_path / "one.txt").write_text("only one document")
  with pytest.raises(ValueError, match="leaves none to train on"):
    make_dataset(small(source="text", paths=(str(tmp_path / "one.txt"),)), vocab_size=512)


def test_synthetic_is_a_pure_function_of_seed_and_step():
  cfg = small(source="synthetic", seq_len=64)
  a = make_dataset(cfg, vocab_size=1000)
  late = a.get_batch(9)
  assert_batches_equal(late, make_dataset(cfg, vocab_size=1000).get_batch(9))
  assert late["inputs"].min() >= 0 and late["inputs"].max() < 1000
  assert (late["segment_ids"] == 1).all() and (late["loss_mask"] == 1).all()
  np.testing.assert_array_equal(late["positions"], np.broadcast_to(np.arange(64), (8, 64)))
  val = make_dataset(cfg, vocab_size=1000, split="validation").get_batch(9)
  other_seed = make_dataset(small(source="synthetic", seq_len=64, seed=4), vocab_size=1000).get_batch(9)
  assert not np.array_equal(late["inputs"], val["inputs"])
  assert not np.array_equal(late["inputs"], other_seed["inputs"])
  assert a.tokenizer is None and a.num_sequences is None
