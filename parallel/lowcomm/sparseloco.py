"""SparseLoCo (Sarfi et al. 2025, "Heterogeneous Low-Bandwidth Pre-Training of LLMs" and its
SparseLoCo method): DiLoCo whose pseudo-gradients are top-k sparsified (1-3% of values) and their
values quantised to 2 bits, with error feedback kept per replica in place of outer momentum.

Outer step, every H inner steps, inside a `jax.shard_map` manual over `axis`:
  e_i <- beta e_i + Delta_i                  (beta = lowcomm.outer_momentum, the feedback decay)
  c_i = Q(topk(e_i))  per island-device row  (lowcomm.topk_fraction; lowcomm.quant_bits, 0: float32)
  e_i <- e_i - c_i
  outer <- outer - lr mean_i c_i             (payloads all-gathered over `axis`, averaged locally)
and every island restarts from the new outer parameters. Bytes per replica per outer step:
the payload (values' codes and scales, int32 indices) of every row, `compress.payload_bytes`.
"""

from __future__ import annotations

from typing import Any

import jax

from parallel.lowcomm import outer
from parallel.lowcomm.compress import Sparse, densify, quantize, topk


def sparse_compressor(fraction: float, bits: int):
  """(compress_row, decompress_row): top-k of a row, its values `bits`-bit quantised (0: as is)."""
  def compress(row):
    s = topk(row, fraction)
    return Sparse(quantize(s.values, bits), s.indices, s.shape, s.dtype) if bits else s
  return compress, densify


def sparseloco_sync(outer_params: Any, local_params: Any, error: Any, *, axis: str, lr: float, beta: float,
                    fraction: float, bits: int) -> tuple[Any, Any, int]:
  """One SparseLoCo outer step. Returns (new outer params, new error feedback, bytes sent)."""
  delta = outer.pseudo_gradient(outer_params, local_params)
  acc = jax.tree.map(lambda e, d: beta * e + d, error, delta)
  mean, sent, n_bytes = outer.compressed_mean(acc, axis, *sparse_compressor(fraction, bits))
  new_error = jax.tree.map(lambda a, s: a - s, acc, sent)
  new_params = jax.tree.map(lambda p, m: (p - lr * m).astype(p.dtype), outer_params, mean)
  return new_params, new_error, n_bytes


class SparseLoCo(outer.PeriodicSync):
  """Outer state (per replica): `params` (outer parameters, identical on all) and `error` (own);
  the sync after every inner_steps-th inner step."""

  buffer = "error"

  def sync(self, outer_params, local_params, error, *, axis):
    c = self.cfg
    return sparseloco_sync(outer_params, local_params, error, axis=axis, lr=c.outer_lr, beta=c.outer_momentum,
                           fraction=c.topk_fraction, bits=c.quant_bits)
