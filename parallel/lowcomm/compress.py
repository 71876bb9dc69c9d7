"""Compressors for what travels over `replica`: b-bit quantisation, top-k sparsification and 1-bit
signs, each with an exact payload size, plus error feedback.

Every compressor is a pure jnp function of one array (any shape, any float dtype): jit-able, usable
inside a `jax.shard_map`, with no communication of its own. Its output is a pytree whose leaves are
exactly what would go on the wire (codes bit-packed into uint8, scales in float32, indices in
int32), so `payload_bytes(payload)` (the sum of the leaves' sizes, static from shapes and dtypes)
is the exact number of bytes sent, and an `all_gather` of the payload moves exactly those bytes.

- `quantize(x, bits)` / `dequantize(q)`: per-chunk absmax scale (float32, one per `chunk` values),
  `2**bits` evenly spaced levels on [-scale, scale], round to nearest or stochastic rounding
  (unbiased: E[dequantize(quantize(x, key))] = x). bits in (2, 4, 8): the 4-bit exchange of
  Streaming DiLoCo (Douillard et al. 2025) and the 2-bit values of SparseLoCo.
- `topk(x, fraction)` / `densify(s)`: the k = round(fraction * x.size) entries of largest magnitude
  (values and flat int32 indices), as in SparseLoCo's pseudo-gradient sparsification.
- `sign_compress(x)` / `sign_decompress(s)`: one bit per value and one float32 scale, the
  L2-optimal mean(|x|) (scaled sign compression as in EF-SignSGD and 1-bit Adam, Tang et al. 2021).
- `with_error_feedback(compress, decompress, x, error)`: sends C(x + error) and keeps the residual
  x + error - sent, so over steps sum(sent) + final error == sum(x) (up to float rounding).
- `gather_mean(payload, decompress, axis)`: the average over `axis` of compressed values, done the
  way compressed values must travel: the payloads are `all_gather`ed (quantised codes cannot be
  summed in flight) and each replica decompresses and averages them locally.

Byte accounting (the whole `lowcomm` family, `outer.py`): the bytes a replica sends in one
exchange are the sizes of its operands of each collective over `replica` (its payload for an
all_gather or all_to_all, the array for a psum), summed over the island's devices, independent of
how the collective is implemented. `payload_bytes` is one device's operand.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

QUANT_BITS = (2, 4, 8)
F32 = jnp.float32


@functools.partial(jax.tree_util.register_dataclass, data_fields=("codes", "scales"),
                   meta_fields=("shape", "dtype", "bits", "chunk"))
@dataclasses.dataclass(frozen=True)
class Quantized:
  """codes: uint8 [ceil(n / chunk) * chunk * bits / 8], `8 // bits` codes per byte (low bits
  first); scales: float32 [ceil(n / chunk)]; shape/dtype: the original array's."""

  codes: jax.Array
  scales: jax.Array
  shape: tuple[int, ...]
  dtype: Any
  bits: int
  chunk: int


@functools.partial(jax.tree_util.register_dataclass, data_fields=("values", "indices"),
                   meta_fields=("shape", "dtype"))
@dataclasses.dataclass(frozen=True)
class Sparse:
  """values: [k] (an array, or a `Quantized` of one); indices: int32 [k] into the flattened array."""

  values: Any
  indices: jax.Array
  shape: tuple[int, ...]
  dtype: Any


@functools.partial(jax.tree_util.register_dataclass, data_fields=("packed", "scale"),
                   meta_fields=("shape", "dtype"))
@dataclasses.dataclass(frozen=True)
class Signs:
  """packed: uint8 [ceil(n / 8)], bit j of byte i is 1 where x.flat[8 i + j] >= 0; scale: float32 [].
  Unpacks as the pair `(packed, scale)`."""

  packed: jax.Array
  scale: jax.Array
  shape: tuple[int, ...]
  dtype: Any

  def __iter__(self):
    return iter((self.packed, self.scale))


def payload_bytes(payload: Any) -> int:
  """Exact bytes of a compressed payload (or of any pytree of arrays): static, from shapes and dtypes."""
  return int(sum(int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(payload)))


def _flat_padded(x: jax.Array, multiple: int) -> jax.Array:
  flat = jnp.ravel(x).astype(F32)
  pad = -flat.size % multiple
  return jnp.pad(flat, (0, pad)) if pad else flat


def pack_codes(codes: jax.Array, bits: int) -> jax.Array:
  """Packs uint8 codes < 2**bits, length a multiple of 8 // bits -> bytes holding 8 // bits codes each."""
  per = 8 // bits
  shifts = jnp.arange(per, dtype=jnp.uint8) * bits
  return jnp.sum(codes.reshape(-1, per).astype(jnp.uint8) << shifts, axis=1, dtype=jnp.uint8)


def unpack_codes(packed: jax.Array, bits: int) -> jax.Array:
  """The inverse of `pack_codes`: uint8 [m] -> uint8 codes [m * 8 // bits]."""
  per = 8 // bits
  shifts = jnp.arange(per, dtype=jnp.uint8) * bits
  return ((packed[:, None] >> shifts) & jnp.uint8(2**bits - 1)).reshape(-1)


def quantize(x: jax.Array, bits: int, *, chunk: int = 256, key: jax.Array | None = None) -> Quantized:
  """b-bit quantisation with one absmax scale per `chunk` consecutive values of x.ravel().

  Levels: scale * (2 q / L - 1) for q in 0..L, L = 2**bits - 1. key=None rounds to the nearest
  level; a PRNG key rounds stochastically (up with probability equal to the distance from the level
  below, in units of the level spacing), which makes the dequantised value unbiased. Payload:
  ceil(n / chunk) * (chunk * bits / 8 + 4) bytes.
  """
  if bits not in QUANT_BITS:
    raise ValueError(f"quantize: bits={bits} not supported; use one of {QUANT_BITS}")
  if chunk <= 0 or chunk % 8:
    raise ValueError(f"quantize: chunk={chunk} must be a positive multiple of 8")
  levels = 2**bits - 1
  blocks = _flat_padded(x, chunk).reshape(-1, chunk)
  scales = jnp.max(jnp.abs(blocks), axis=1)
  safe = jnp.where(scales > 0, scales, 1.0)
  u = (blocks / safe[:, None] + 1.0) * (levels / 2)
  if key is None:
    q = jnp.round(u)
  else:
    q = jnp.floor(u + jax.random.uniform(key, blocks.shape, F32))
  codes = jnp.clip(q, 0, levels).astype(jnp.uint8).reshape(-1)
  return Quantized(pack_codes(codes, bits), scales, tuple(x.shape), jnp.dtype(x.dtype), bits, chunk)


def dequantize(q: Quantized) -> jax.Array:
  """The quantised values, in the original shape and dtype."""
  levels = 2**q.bits - 1
  codes = unpack_codes(q.codes, q.bits).reshape(-1, q.chunk).astype(F32)
  blocks = q.scales[:, None] * (codes * (2.0 / levels) - 1.0)
  n = int(np.prod(q.shape))
  return blocks.reshape(-1)[:n].reshape(q.shape).astype(q.dtype)


def topk_count(size: int, fraction: float) -> int:
  """k kept by `topk`: round(fraction * size), at least 1 and at most size."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"topk: fraction={fraction} must be in (0, 1]")
  return min(size, max(1, round(fraction * size)))


def topk(x: jax.Array, fraction: float) -> Sparse:
  """The k = topk_count(x.size, fraction) entries of x.ravel() of largest magnitude (ties: lowest
  index first). Payload: k values in x's dtype + k int32 indices."""
  flat = jnp.ravel(x)
  _, indices = jax.lax.top_k(jnp.abs(flat), topk_count(flat.size, fraction))
  indices = indices.astype(jnp.int32)
  return Sparse(flat[indices], indices, tuple(x.shape), jnp.dtype(x.dtype))


def densify(s: Sparse) -> jax.Array:
  """The dense array with s.values at s.indices and zeros elsewhere (values may be `Quantized`)."""
  values = dequantize(s.values) if isinstance(s.values, Quantized) else s.values
  n = int(np.prod(s.shape))
  return jnp.zeros((n,), s.dtype).at[s.indices].set(values.astype(s.dtype)).reshape(s.shape)


def sign_compress(x: jax.Array) -> Signs:
  """1 bit per value (x >= 0) and scale = mean(|x|), the scale minimising ||x - scale * sign(x)||.
  Payload: ceil(n / 8) + 4 bytes."""
  flat = jnp.ravel(x).astype(F32)
  scale = jnp.mean(jnp.abs(flat))
  bits = jnp.pad((flat >= 0).astype(jnp.uint8), (0, -flat.size % 8))  # padding bits are 0
  return Signs(pack_codes(bits, 1), scale, tuple(x.shape), jnp.dtype(x.dtype))


def sign_decompress(s: Signs) -> jax.Array:
  """scale * (+1 or -1) per value, in the original shape and dtype."""
  n = int(np.prod(s.shape))
  signs = unpack_codes(s.packed, 1)[:n].astype(F32) * 2.0 - 1.0
  return (s.scale * signs).reshape(s.shape).astype(s.dtype)


def compress_with_feedback(compress: Callable[[jax.Array], Any], decompress: Callable[[Any], jax.Array],
                           x: jax.Array, error: jax.Array) -> tuple[Any, jax.Array, jax.Array]:
  """Error feedback: payload = compress(x + error), sent = decompress(payload),
  new_error = x + error - sent. Returns (payload, sent, new_error); the payload is what travels."""
  corrected = x + error
  payload = compress(corrected)
  sent = decompress(payload)
  return payload, sent, corrected - sent


def with_error_feedback(compress: Callable[[jax.Array], Any], decompress: Callable[[Any], jax.Array],
                        x: jax.Array, error: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sent, new_error) of `compress_with_feedback`: sum over steps of sent, plus the last error,
  equals the sum of the x's (what was meant to be sent)."""
  _, sent, new_error = compress_with_feedback(compress, decompress, x, error)
  return sent, new_error


def gather_mean(payload: Any, decompress: Callable[[Any], jax.Array], axis: str) -> tuple[jax.Array, int]:
  """Inside a shard_map manual over `axis`: the mean over `axis` of decompress(payload).

  Communicates one all_gather of every payload leaf over `axis` (each replica's payload reaches all
  the others), then decompresses the n payloads locally and averages them in float32, so the
  result is identical on every replica. Returns (mean, bytes sent by this replica =
  payload_bytes(payload)).
  """
  gathered = jax.tree.map(lambda leaf: jax.lax.all_gather(leaf, axis, to="invarying"), payload)
  values = jax.vmap(decompress)(gathered)
  mean = jnp.mean(values.astype(F32), axis=0).astype(values.dtype)
  return mean, payload_bytes(payload)
