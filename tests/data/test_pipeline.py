"""The dataset: documented shapes, determinism, exact resumption, process slices, shuffling,
train/validation splits, synthetic tokens and the errors of bad settings."""

import json

import numpy as np
import pytest

from data import ByteTokenizer, make_dataset
from data.corpus import builtin_corpus
from data.packing import PackedSequences, pack_documents
from data.pipeline import split_documents
from tests.data.common import EOS, KEYS, assert_batches_equal, epoch_rows, small


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
