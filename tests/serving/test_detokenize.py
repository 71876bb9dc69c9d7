"""Incremental detokenisation and stop strings, one token at a time, against whole-text references."""

from __future__ import annotations

import random

import pytest

from data.tokenizer import ByteTokenizer, HFTokenizer
from serving.detokenize import IncrementalDetokenizer, StopStringMatcher

TEXT = "Grüße, 世界! naïve café 🙂🙂 — done.\n  indented   spaces"


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> HFTokenizer:
  """A byte-level BPE tokenizer.json trained on a few lines (multi-byte characters span tokens)."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  corpus = ["hello world, the quick brown fox", "Grüße aus der Welt", "naïve café", TEXT] * 20
  tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  tok.save(str(path))
  return HFTokenizer(str(path))


@pytest.mark.parametrize("which", ["bytes", "bpe"])
def test_deltas_join_to_the_whole_decode(which, bpe):
  tok = ByteTokenizer() if which == "bytes" else bpe
  prompt, ids = tok.encode("Prompt: "), tok.encode(TEXT)
  rng = random.Random(0)
  detok, pieces, i = IncrementalDetokenizer(tok, prompt), [], 0
  while i < len(ids):  # tokens arrive in groups of 1-3, as decode_steps > 1 delivers them
    n = rng.randint(1, 3)
    pieces.append(detok.push(ids[i:i + n]))
    i += n
  pieces.append(detok.flush())
  assert "".join(pieces) == tok.decode(ids) == TEXT
  assert not any("\ufffd" in p for p in pieces)  # never half a character


def test_an_incomplete_character_at_the_end_is_flushed():
  detok = IncrementalDetokenizer(ByteTokenizer(), [])
  emoji = list("🙂".encode())
  assert detok.push([ord("a")]) == "a"
  assert detok.push(emoji[:2]) == ""  # half a character: held back
  assert detok.flush() == "\ufffd"


def _reference_cut(text: str, stops: list[str]) -> tuple[str, bool]:
  """Character by character: the text stops at the first prefix that holds a stop string."""
  for end in range(1, len(text) + 1):
    hits = [text[:end].find(s) for s in stops if s in text[:end]]
    if hits:
      return text[:min(hits)], True
  return text, False


def test_the_first_stop_string_to_complete_wins_however_text_is_grouped():
  for pieces in (["abcd"], ["a", "b", "c", "d"]):
    matcher = StopStringMatcher(["abcd", "bc"])
    for p in pieces:
      matcher.add(p)
    assert (matcher.text, matcher.stopped) == ("a", True)


def test_stop_strings_match_the_whole_text_reference():
  rng = random.Random(1)
  for _ in range(300):
    text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 20)))
    stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
    matcher, cuts, emitted = StopStringMatcher(stops), sorted(rng.choices(range(len(text) + 1), k=3)), ""
    for a, b in zip([0] + cuts, cuts + [len(text)]):
      matcher.add(text[a:b])
      safe = matcher.text[:matcher.safe_length()]
      assert safe.startswith(emitted)  # what was safe to send stays true
      emitted = safe
    want, stopped = _reference_cut(text, stops)
    assert (matcher.text, matcher.stopped) == (want, stopped), (text, stops)
    if not stopped:  # the held-back tail is a prefix of some stop string, nothing more
      tail = matcher.text[len(emitted):]
      assert tail == "" or any(s.startswith(tail) for s in stops)
