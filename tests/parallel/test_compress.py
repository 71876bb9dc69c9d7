"""Compressors against numpy re-implementations written here; error feedback's conservation; exact
payload bytes counted by hand; the compressed average over `replica` on the 8-device mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from parallel.lowcomm import compress as C
from parallel.mesh import make_mesh


def _np_unpack(packed, bits):
  """Byte i holds codes 8/bits*i .. low bits first (written independently of compress._unpack)."""
  out = []
  for byte in np.asarray(packed, np.uint8):
    for j in range(8 // bits):
      out.append((int(byte) >> (bits * j)) & (2**bits - 1))
  return np.array(out)


def _np_quantize(x, bits, chunk, uniforms=None):
  """Per-chunk absmax, 2**bits levels on [-s, s]; returns (codes, scales, dequantised)."""
  flat = np.asarray(x, np.float32).ravel()
  flat = np.concatenate([flat, np.zeros(-flat.size % chunk, np.float32)]).reshape(-1, chunk)
  levels = 2**bits - 1
  scales = np.abs(flat).max(axis=1)
  safe = np.where(scales > 0, scales, np.float32(1))
  u = (flat / safe[:, None] + np.float32(1)) * np.float32(levels / 2)
  q = np.round(u) if uniforms is None else np.floor(u + uniforms)
  q = np.clip(q, 0, levels)
  deq = scales[:, None].astype(np.float64) * (q * 2.0 / levels - 1.0)
  return q.ravel().astype(np.int64), scales, deq.ravel()[:np.size(x)].reshape(np.shape(x))


@pytest.fixture(scope="module")
def x():
  return jax.random.normal(jax.random.key(0), (5, 61), jnp.float32) * jnp.linspace(0.1, 3.0, 61)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_matches_numpy(x, bits):
  q = jax.jit(lambda a: C.quantize(a, bits, chunk=64))(x)
  codes, scales, deq = _np_quantize(x, bits, 64)
  np.testing.assert_array_equal(_np_unpack(q.codes, bits), codes)
  np.testing.assert_allclose(q.scales, scales, rtol=0)
  got = jax.jit(C.dequantize)(q)
  assert got.shape == x.shape and got.dtype == x.dtype
  np.testing.assert_allclose(got, deq, rtol=1e-6, atol=1e-6 * np.abs(deq).max())
  assert np.abs(np.asarray(got) - np.asarray(x)).max() <= np.abs(x).max() / (2**bits - 1) * 1.0001


def test_stochastic_rounding_matches_numpy_and_is_unbiased(x):
  key = jax.random.key(3)
  q = C.quantize(x, 2, chunk=64, key=key)
  uniforms = np.asarray(jax.random.uniform(key, (5, 64), jnp.float32))
  codes, _, deq = _np_quantize(x, 2, 64, uniforms)
  np.testing.assert_array_equal(_np_unpack(q.codes, 2), codes)
  np.testing.assert_allclose(C.dequantize(q), deq, rtol=1e-6, atol=1e-6 * np.abs(deq).max())

  n = 4000
  keys = jax.random.split(jax.random.key(7), n)
  samples = jax.jit(jax.vmap(lambda k: C.dequantize(C.quantize(x, 2, chunk=64, key=k))))(keys)
  mean = np.asarray(samples, np.float64).mean(axis=0)
  # each sample is one of two adjacent levels: standard deviation <= spacing / 2 per value
  spacing = 2 * np.abs(_np_quantize(x, 2, 64)[1]).max() / 3
  assert np.abs(mean - np.asarray(x)).max() < 5 * spacing / 2 / np.sqrt(n)
  nearest = np.asarray(C.dequantize(C.quantize(x, 2, chunk=64)))
  assert np.abs(nearest - np.asarray(x)).mean() > 10 * np.abs(mean - np.asarray(x)).mean()


def test_zero_chunk_quantizes_to_zero():
  z = jnp.zeros((16,), jnp.float32)
  np.testing.assert_array_equal(C.dequantize(C.quantize(z, 2, chunk=8)), np.zeros(16))


def test_topk_matches_numpy_argsort(x):
  s = jax.jit(lambda a: C.topk(a, 0.05))(x)
  flat = np.asarray(x).ravel()
  k = round(0.05 * flat.size)
  want = np.argsort(-np.abs(flat), kind="stable")[:k]
  np.testing.assert_array_equal(s.indices, want)
  np.testing.assert_array_equal(s.values, flat[want])
  dense = np.zeros_like(flat)
  dense[want] = flat[want]
  np.testing.assert_array_equal(jax.jit(C.densify)(s), dense.reshape(x.shape))


def test_topk_with_quantized_values_densifies(x):
  s = C.topk(x, 0.1)
  sq = C.Sparse(C.quantize(s.values, 2, chunk=32), s.indices, s.shape, s.dtype)
  flat = np.asarray(x).ravel()
  want_idx = np.argsort(-np.abs(flat), kind="stable")[:round(0.1 * flat.size)]
  dense = np.zeros(flat.size)
  dense[want_idx] = _np_quantize(flat[want_idx], 2, 32)[2]
  np.testing.assert_allclose(C.densify(sq), dense.reshape(x.shape), rtol=1e-6, atol=1e-6 * np.abs(dense).max())


def test_sign_compress_matches_numpy(x):
  signs, scale = C.sign_compress(x)
  flat = np.asarray(x).ravel()
  bits = np.concatenate([flat >= 0, np.zeros(-flat.size % 8, bool)])
  np.testing.assert_array_equal(signs, np.packbits(bits, bitorder="little"))
  np.testing.assert_allclose(scale, np.abs(flat.astype(np.float64)).mean(), rtol=1e-6)
  got = C.sign_decompress(C.sign_compress(x))
  np.testing.assert_allclose(got, np.abs(flat).mean() * np.where(flat >= 0, 1.0, -1.0).reshape(x.shape), rtol=1e-6)


_COMPRESSORS = {
    "quant2": (lambda a: C.quantize(a, 2, chunk=64), C.dequantize),
    "quant4_stochastic": (lambda a: C.quantize(a, 4, chunk=64, key=jax.random.key(1)), C.dequantize),
    "topk": (lambda a: C.topk(a, 0.05), C.densify),
    "sign": (C.sign_compress, C.sign_decompress),
}


@pytest.mark.parametrize("name", sorted(_COMPRESSORS))
def test_error_feedback_conserves_what_was_meant_to_be_sent(name):
  compress, decompress = _COMPRESSORS[name]
  step = jax.jit(lambda a, e: C.with_error_feedback(compress, decompress, a, e))
  xs = np.asarray(jax.random.normal(jax.random.key(1), (12, 7, 40), jnp.float32))
  error = jnp.zeros((7, 40), jnp.float32)
  sent_sum = np.zeros((7, 40))
  for t in range(xs.shape[0]):
    sent, error = step(xs[t], error)
    sent_sum += np.asarray(sent, np.float64)
  meant = xs.astype(np.float64).sum(axis=0)
  assert np.linalg.norm(sent_sum - meant) > 1e-2 * np.linalg.norm(meant)  # compression was lossy
  total = sent_sum + np.asarray(error, np.float64)
  assert np.linalg.norm(total - meant) <= 1e-5 * np.linalg.norm(meant)


def test_payload_bytes_by_hand():
  x = jnp.ones((3, 100), jnp.float32)  # 300 values
  assert C.payload_bytes(C.quantize(x, 4, chunk=64)) == 5 * 64 // 2 + 5 * 4  # 5 chunks: codes + scales
  assert C.payload_bytes(C.quantize(x, 2, chunk=64)) == 5 * 64 // 4 + 5 * 4
  assert C.payload_bytes(C.quantize(x, 8, chunk=64)) == 5 * 64 + 5 * 4
  assert C.payload_bytes(C.topk(x, 0.1)) == 30 * 4 + 30 * 4  # float32 values + int32 indices
  assert C.payload_bytes(C.topk(x.astype(jnp.bfloat16), 0.1)) == 30 * 2 + 30 * 4
  assert C.payload_bytes(C.sign_compress(x)) == 38 + 4  # ceil(300 / 8) bytes + one float32 scale
  s = C.topk(x, 0.1)
  assert C.payload_bytes(C.Sparse(C.quantize(s.values, 2, chunk=32), s.indices, s.shape, s.dtype)) == 8 + 4 + 120
  assert C.payload_bytes(x) == 1200
  shapes = jax.eval_shape(lambda a: C.quantize(a, 4, chunk=64), x)  # static: no values needed
  assert C.payload_bytes(shapes) == 180


def test_bad_inputs_raise():
  x = jnp.ones((8,))
  with pytest.raises(ValueError, match="bits=3"):
    C.quantize(x, 3)
  with pytest.raises(ValueError, match="chunk=12"):
    C.quantize(x, 4, chunk=12)
  for fraction in (0.0, 1.5):
    with pytest.raises(ValueError, match="fraction"):
      C.topk(x, fraction)


def test_gather_mean_over_replica():
  mesh = make_mesh({"replica": 8})
  xs = jax.random.normal(jax.random.key(2), (8, 3, 50), jnp.float32)

  def body(x_local):
    mean, nbytes = C.gather_mean(C.quantize(x_local[0], 4, chunk=32), C.dequantize, "replica")
    assert nbytes == 5 * 16 + 5 * 4
    return mean[None]

  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("replica"), out_specs=P("replica"), check_vma=True))
  got = np.asarray(f(xs))
  want = np.mean([_np_quantize(xs[i], 4, 32)[2] for i in range(8)], axis=0)
  for i in range(8):
    np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
  hlo = f.lower(xs).as_text()
  assert "all_gather" in hlo or "all-gather" in hlo
