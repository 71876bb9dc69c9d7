"""Packing: the window rules of data/packing.py checked on hand-built streams and random documents."""

import numpy as np
import pytest

from data import ByteTokenizer
from data.packing import PackedSequences, pack_documents
from tests.data.common import EOS


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
