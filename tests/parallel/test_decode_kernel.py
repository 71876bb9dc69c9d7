"""The one-kernel decode attention (parallel/attention/decode_kernel.py) in the Pallas interpreter,
against a per-row, per-head softmax written here in numpy: each query head over its kv head's
first cache_len cached positions and the new token."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from parallel.attention.decode_kernel import block_size, decode_attention, default_splits


def _numpy_reference(q, k_new, v_new, cache_k, cache_v, lengths):
  b, h, d = q.shape
  kv = k_new.shape[1]
  out = np.zeros((b, h, d), np.float64)
  for r in range(b):
    for head in range(h):
      j = head // (h // kv)
      keys = np.concatenate([cache_k[r, j, :lengths[r]], k_new[r, j][None]]).astype(np.float64)
      values = np.concatenate([cache_v[r, j, :lengths[r]], v_new[r, j][None]]).astype(np.float64)
      s = keys @ q[r, head].astype(np.float64) / np.sqrt(d)
      p = np.exp(s - s.max())
      out[r, head] = (p / p.sum()) @ values
  return out


def _inputs(b, h, kv, s, d, lengths, dtype, seed=0):
  rng = np.random.default_rng(seed)
  arrays = [rng.standard_normal(shape).astype(np.float32) for shape in
            ((b, h, d), (b, kv, d), (b, kv, d), (b, kv, s, d), (b, kv, s, d))]
  arrays = [np.asarray(jnp.asarray(a, dtype).astype(jnp.float32)) for a in arrays]  # values the dtype holds
  return arrays, np.asarray(lengths, np.int32)


@pytest.mark.parametrize("h,kv,lengths,block_s,splits", [
    (4, 2, [0, 5, 16, 64], 16, None),   # an empty cache, a partial block, a full block, the whole span
    (2, 2, [37, 1, 63, 20], 32, 2),     # one query head per kv head; lengths off the block grid
    (8, 1, [50, 64, 3, 33], None, 1),   # multi-query (8 heads on one kv head); one part, the default block
    (4, 2, [0, 17, 40, 64], 16, 4),     # parts with no valid position, partly valid, all valid
])
def test_decode_attention_matches_numpy_float32(h, kv, lengths, block_s, splits):
  (q, kn, vn, ck, cv), lens = _inputs(4, h, kv, 64, 16, lengths, jnp.float32)
  got = decode_attention(*(jnp.asarray(a) for a in (q, kn, vn, ck, cv)), jnp.asarray(lens), block_s=block_s,
                         splits=splits, interpret=True)
  np.testing.assert_allclose(np.asarray(got), _numpy_reference(q, kn, vn, ck, cv, lens), rtol=1e-5, atol=1e-5)


def test_decode_attention_bf16_and_stale_positions_ignored():
  """bf16 operands within bf16 tolerance; what lies past a row's length (stale or garbage) changes nothing."""
  (q, kn, vn, ck, cv), lens = _inputs(2, 4, 2, 128, 32, [70, 127], jnp.bfloat16, seed=1)
  args = lambda ck, cv: [jnp.asarray(a, jnp.bfloat16) for a in (q, kn, vn, ck, cv)] + [jnp.asarray(lens)]
  got = decode_attention(*args(ck, cv), interpret=True)
  want = _numpy_reference(q, kn, vn, ck, cv, lens)
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=2e-2, atol=2e-2)
  ck2, cv2 = ck.copy(), cv.copy()
  ck2[0, :, 70:], cv2[0, :, 70:] = 1e4, -1e4
  again = decode_attention(*args(ck2, cv2), interpret=True)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(got))


def test_decode_attention_reads_one_layer_of_a_stacked_cache():
  """With `layer` (traced, as in a scan over layers) the kernel reads that layer of [L, B, K, S, D]."""
  (q, kn, vn, ck, cv), lens = _inputs(2, 4, 2, 64, 16, [9, 50], jnp.float32, seed=2)
  rng = np.random.default_rng(3)
  stack = lambda a: np.stack([rng.standard_normal(a.shape).astype(np.float32), a, -a])  # layer 1 is `a`
  run = jax.jit(lambda layer, *args: decode_attention(*args, layer=layer, splits=2, interpret=True))
  got = run(jnp.int32(1), *(jnp.asarray(a) for a in (q, kn, vn, stack(ck), stack(cv), lens)))
  np.testing.assert_allclose(np.asarray(got), _numpy_reference(q, kn, vn, ck, cv, lens), rtol=1e-5, atol=1e-5)


def test_decode_attention_writes_the_new_tokens_in_place():
  """With `write_positions` the kernel also writes row b's new key and value at its position of
  the traced layer (a row past the span writes nothing) and returns the caches: equal to numpy's
  update of them, the other layers and positions untouched; the output is the one without writes."""
  (q, kn, vn, ck, cv), lens = _inputs(2, 4, 2, 64, 16, [9, 50], jnp.float32, seed=5)
  stacked = [np.stack([a, -a, 2 * a]) for a in (ck, cv)]  # [L=3, B, K, S, D]
  positions = np.asarray([9, 64], np.int32)  # row 1 inactive (its position is past the span)
  run = jax.jit(lambda layer, *args: decode_attention(*args, layer=layer, write_positions=jnp.asarray(positions),
                                                      splits=2, interpret=True))
  out, got_k, got_v = run(jnp.int32(2), *(jnp.asarray(a) for a in (q, kn, vn, *stacked, lens)))
  np.testing.assert_allclose(np.asarray(out), _numpy_reference(q, kn, vn, 2 * ck, 2 * cv, lens), rtol=1e-5, atol=1e-5)
  for got, want, new in zip((got_k, got_v), stacked, (kn, vn)):
    want = want.copy()
    want[2, 0, :, 9] = new[0]
    np.testing.assert_array_equal(np.asarray(got), want)


def test_decode_attention_rejects_bad_shapes():
  q = jnp.zeros((2, 4, 16))
  kv = jnp.zeros((2, 2, 16))
  cache = jnp.zeros((2, 2, 64, 16))
  lens = jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match="do not group"):
    decode_attention(jnp.zeros((2, 3, 16)), kv, kv, cache, cache, lens, interpret=True)
  with pytest.raises(ValueError, match="block_s=24"):
    decode_attention(q, kv, kv, cache, cache, lens, block_s=24, interpret=True)
  with pytest.raises(ValueError, match=r"or \[L, B, K, S, D\] with `layer`"):
    decode_attention(q, kv, kv, cache, cache, lens, layer=jnp.int32(0), interpret=True)
  with pytest.raises(ValueError, match="splits=3"):
    decode_attention(q, kv, kv, cache, cache, lens, splits=3, interpret=True)
  with pytest.raises(ValueError, match="block_s=32 must be .* a part of 16"):
    decode_attention(q, kv, kv, cache, cache, lens, splits=4, block_s=32, interpret=True)
  with pytest.raises(ValueError, match="cache_len"):
    decode_attention(q, kv, kv, cache, cache, jnp.zeros((3,), jnp.int32), interpret=True)
  assert block_size(1152) == 128 and block_size(48) == 16 and block_size(40) == 0
  assert default_splits(2, 8, 512) == 16 and default_splits(32, 8, 512) == 1 and default_splits(2, 8, 64) == 4 and default_splits(1, 1, 48) == 1


def test_decode_attention_reads_pages_in_place():
  """With `page_table` each row's positions come from the pages its table lists, read in place: a
  page shared by two rows, entries past a row's pages unassigned (the pool's size), an empty row, a
  traced layer of the stacked pages. Against the numpy reference over each row's pages laid end to end."""
  rng = np.random.default_rng(4)
  b, h, kv, d, page, pool, layers = 3, 4, 2, 16, 16, 7, 3
  lengths = np.asarray([37, 0, 64], np.int32)
  table = np.asarray([[2, 5, 6, pool], [pool] * 4, [2, 0, 3, 1]], np.int32)  # page 2 in rows 0 and 2
  q, kn, vn = (rng.standard_normal(shape).astype(np.float32) for shape in ((b, h, d), (b, kv, d), (b, kv, d)))
  pages_k, pages_v = (rng.standard_normal((layers, pool, kv, page, d)).astype(np.float32) for _ in range(2))

  def rows(pages):  # [B, K, S, D] of layer 1: row r's table entries' pages, in order (zeros where unassigned)
    out = np.zeros((b, kv, table.shape[1] * page, d), np.float32)
    for r in range(b):
      for i, entry in enumerate(table[r]):
        if entry < pool:
          out[r, :, i * page:(i + 1) * page] = pages[1, entry]
    return out

  run = jax.jit(lambda layer, *args, splits: decode_attention(*args, layer=layer, page_table=jnp.asarray(table),
                                                              splits=splits, interpret=True), static_argnames="splits")
  want = _numpy_reference(q, kn, vn, rows(pages_k), rows(pages_v), lengths)
  for splits in (1, 4):
    got = run(jnp.int32(1), *(jnp.asarray(a) for a in (q, kn, vn, pages_k, pages_v, lengths)), splits=splits)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  # Writing the new tokens: row 0 at position 37 (page 6, offset 5), row 1 on an unassigned page and
  # row 2 past the span write nothing.
  write = jax.jit(lambda *args: decode_attention(*args, layer=jnp.int32(1), page_table=jnp.asarray(table),
                                                 write_positions=jnp.asarray([37, 3, 64], jnp.int32), interpret=True))
  out, got_k, got_v = write(*(jnp.asarray(a) for a in (q, kn, vn, pages_k, pages_v, lengths)))
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
  for got, pages, new in zip((got_k, got_v), (pages_k, pages_v), (kn, vn)):
    expect = pages.copy()
    expect[1, 6, :, 5] = new[0]
    np.testing.assert_array_equal(np.asarray(got), expect)


def test_decode_attention_rejects_bad_pages():
  q, kv = jnp.zeros((2, 4, 16)), jnp.zeros((2, 2, 16))
  lens = jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match="page_size=8 must be a multiple of 16"):
    pages = jnp.zeros((5, 2, 8, 16))
    decode_attention(q, kv, kv, pages, pages, lens, page_table=jnp.zeros((2, 4), jnp.int32), interpret=True)
  with pytest.raises(ValueError, match=r"page_table must be \[B=2"):
    pages = jnp.zeros((5, 2, 16, 16))
    decode_attention(q, kv, kv, pages, pages, lens, page_table=jnp.zeros((3, 4), jnp.int32), interpret=True)
