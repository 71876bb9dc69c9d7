"""Pallas (Triton) matrix-vector products for decoding a few rows at a time, measured by
`bench/decode_kernels.py` against XLA's cuBLAS products (results in BENCHMARKS.md). The engine does
not use them: at `1b` shapes they stream a step's weights no faster than XLA does (see there).

A decode step at batch 1 reads every weight once and does almost nothing else, so its time is the
time to stream the weights plus the time of every kernel launched between them. XLA runs a `1b`
layer as 6 cuBLAS products and about 15 small fusions (norms, RoPE, softmax, residual adds). These
kernels fold the elementwise work before or after a product into it:

  gemv          y = norm(x) @ w.T (+ residual): the RMSNorm prologue (every program reads the whole
                row of x, so its statistics cost no second pass over the weight) and a residual
                epilogue.
  gemv_swiglu   silu(norm(x) @ w_gate.T) * (norm(x) @ w_up.T), gate and up read from one [F, 2, K]
                weight by the same program.

Weights are output-major ([N, K]: each output's K inputs contiguous); a program computes
`block_n` outputs over all K inputs, in float32, for every row of x. Two ways to sum:

  fma   each row on its own, every chunk of `block_k` inputs multiplied into a [block_n, block_k]
        accumulator, reduced over K once at the end (chunks unrolled: all their loads in flight)
  dot   a tensor-core product per chunk ([16 rows, block_k] x [block_k, block_n], rows padded to
        16) in a loop that Triton pipelines (`num_stages` chunks in flight)

`interpret=True` runs them anywhere (on CPUs, for checking).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

F32 = jnp.float32


@functools.lru_cache(maxsize=None)
def _compiler_params(num_warps: int, num_stages: int):
  from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415 - only where a kernel is built

  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _check(name: str, x_BxK: jax.Array, k: int, block_k: int) -> None:
  if x_BxK.ndim != 2 or x_BxK.shape[1] != k:
    raise ValueError(f"{name}: x must be [rows, {k}], got {x_BxK.shape}")
  if k % block_k:
    raise ValueError(f"{name}: block_k={block_k} must divide K={k}")


def _norm_inv(x_ref, rows_x, *, k: int, block_k: int, eps: float | None):
  """1 / rms(x) of the rows `rows_x` of x [b, 1] (float32), or None without a norm."""
  if eps is None:
    return None
  ss = sum(jnp.sum(jnp.square(x_ref[rows_x, pl.ds(i * block_k, block_k)].astype(F32)), axis=1, keepdims=True)
           for i in range(k // block_k))
  return jax.lax.rsqrt(ss / k + eps)


def _x_chunk(x_ref, g_ref, inv, rows_x, cols):
  """Rows `rows_x`, columns `cols` of x (float32), RMS-normalised when `inv` is set and rounded to
  x's dtype after the norm, as `models.layers.rms_norm` returns it."""
  c = x_ref[rows_x, cols].astype(F32)
  if inv is None:
    return c
  return (c * inv * g_ref[cols].astype(F32)[None, :]).astype(x_ref.dtype).astype(F32)


def _products(x_ref, g_ref, w_ref, rows, *, k: int, block_k: int, eps, method: str, middles=(None,)):
  """sum over K of norm(x) [B, K] * w [rows, K]: for each entry of `middles` (w_ref's middle index:
  gate and up of a [F, 2, K] weight) a list of (rows of x, [b, block] float32) pieces.

  "fma": each row of x on its own; every chunk of `block_k` inputs multiplied into a
  [block, block_k] float32 accumulator, reduced over K once at the end (the chunks are unrolled,
  so all their loads can be in flight at once).
  "dot": a tensor-core product per chunk, [B, block_k] x [block_k, block] (B padded to 16), in a
  loop that Triton pipelines (`num_stages` chunks in flight)."""
  w_at = lambda m, cols: w_ref[rows, cols] if m is None else w_ref[rows, m, cols]
  chunks = [pl.ds(i * block_k, block_k) for i in range(k // block_k)]
  if method == "fma":
    out = [[] for _ in middles]
    for r in range(x_ref.shape[0]):
      rx = pl.ds(r, 1)
      inv = _norm_inv(x_ref, rx, k=k, block_k=block_k, eps=eps)
      accs = [None] * len(middles)
      for cols in chunks:
        ws = [w_at(m, cols).astype(F32) for m in middles]  # loads first: they do not wait for x
        x = _x_chunk(x_ref, g_ref, inv, rx, cols)
        accs = [w * x if a is None else a + w * x for a, w in zip(accs, ws)]
      for j, a in enumerate(accs):
        out[j].append((rx, jnp.sum(a, axis=1)[None, :]))
    return out

  every = pl.ds(0, x_ref.shape[0])
  inv = _norm_inv(x_ref, every, k=k, block_k=block_k, eps=eps)

  def body(i, accs):
    cols = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
    x = _x_chunk(x_ref, g_ref, inv, every, cols).astype(x_ref.dtype)
    nt = (((1,), (1,)), ((), ()))  # x [B, block_k] . w [block, block_k] over block_k
    return tuple(acc + jax.lax.dot_general(x, w_at(m, cols), nt, preferred_element_type=F32)
                 for acc, m in zip(accs, middles))

  init = tuple(jnp.zeros((x_ref.shape[0], rows.size), F32) for _ in middles)
  return [[(every, acc)] for acc in jax.lax.fori_loop(0, k // block_k, body, init)]


def _gemv_kernel(*refs, k, block_n, block_k, eps, residual, method):
  x_ref, w_ref, *rest = refs
  g_ref = rest.pop(0) if eps is not None else None
  r_ref = rest.pop(0) if residual else None
  (o_ref,) = rest
  rows = pl.ds(pl.program_id(0) * block_n, block_n)
  (pieces,) = _products(x_ref, g_ref, w_ref, rows, k=k, block_k=block_k, eps=eps, method=method)
  for rx, y in pieces:
    if residual:
      y = y + r_ref[rx, rows].astype(F32)
    o_ref[rx, rows] = y.astype(o_ref.dtype)


def _swiglu_kernel(*refs, k, block_n, block_k, eps, method):
  x_ref, w_ref, *rest = refs
  g_ref = rest.pop(0) if eps is not None else None
  (o_ref,) = rest
  rows = pl.ds(pl.program_id(0) * block_n, block_n)
  gates, ups = _products(x_ref, g_ref, w_ref, rows, k=k, block_k=block_k, eps=eps, method=method, middles=(0, 1))
  for (rx, gate), (_, up) in zip(gates, ups):
    gate, up = (a.astype(o_ref.dtype).astype(F32) for a in (gate, up))
    o_ref[rx, rows] = (gate * jax.nn.sigmoid(gate) * up).astype(o_ref.dtype)


def _call(kernel, x_BxK, w, extra, *, n, k, block_n, block_k, method, num_warps, num_stages, interpret, name):
  _check(name, x_BxK, k, block_k)
  if n % block_n:
    raise ValueError(f"{name}: block_n={block_n} must divide N={n}")
  if method not in ("fma", "dot"):
    raise ValueError(f"{name}: method must be 'fma' or 'dot', got {method!r}")
  b = x_BxK.shape[0]
  if b > (8 if method == "fma" else 16):
    raise ValueError(f"{name}: {b} rows is more than the {method!r} kernel takes (8 for fma, 16 for dot)")
  rows = max(pl.next_power_of_2(b), 16 if method == "dot" else 1)  # tensor-core products need 16
  pad = lambda a: jnp.pad(a, ((0, rows - b), (0, 0)))
  args = [pad(x_BxK), w] + [pad(a) if a.ndim == 2 else a for a in extra]
  out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((rows, n), x_BxK.dtype), grid=(n // block_n,),
                       interpret=interpret,
                       compiler_params=None if interpret else _compiler_params(num_warps, num_stages))(*args)
  return out[:b]


def gemv(x_BxK: jax.Array, w_NxK: jax.Array, *, norm_scale_K: jax.Array | None = None, eps: float = 1e-6,
         residual_BxN: jax.Array | None = None, block_n: int = 8, block_k: int = 512, method: str = "fma",
         num_warps: int = 4, num_stages: int = 1, interpret: bool = False) -> jax.Array:
  """[B, N] = rms_norm(x, norm_scale) @ w.T (+ residual), in x's dtype; without `norm_scale_K`, x as is.

  x [B, K] (B: at most 8 rows with "fma", 16 with "dot"); w [N, K] output-major; block_n must
  divide N and block_k K, both powers of two. One program per block_n outputs."""
  n, k = w_NxK.shape
  extra = [a for a in (norm_scale_K, residual_BxN) if a is not None]
  kernel = functools.partial(_gemv_kernel, k=k, block_n=block_n, block_k=block_k, method=method,
                             eps=None if norm_scale_K is None else eps, residual=residual_BxN is not None)
  return _call(kernel, x_BxK, w_NxK, extra, n=n, k=k, block_n=block_n, block_k=block_k, method=method,
               num_warps=num_warps, num_stages=num_stages, interpret=interpret, name="gemv")


def gemv_swiglu(x_BxK: jax.Array, w_Fx2xK: jax.Array, *, norm_scale_K: jax.Array | None = None, eps: float = 1e-6,
                block_n: int = 4, block_k: int = 512, method: str = "fma", num_warps: int = 4, num_stages: int = 1,
                interpret: bool = False) -> jax.Array:
  """[B, F] = silu(g) * u where g, u = rms_norm(x, norm_scale) @ w[:, 0].T, @ w[:, 1].T (rounded to
  x's dtype first, as the model's SwiGLU sees them); w [F, 2, K] output-major, gate then up."""
  f, two, k = w_Fx2xK.shape
  if two != 2:
    raise ValueError(f"gemv_swiglu: w must be [F, 2, K] (gate, up), got {w_Fx2xK.shape}")
  kernel = functools.partial(_swiglu_kernel, k=k, block_n=block_n, block_k=block_k, method=method,
                             eps=None if norm_scale_K is None else eps)
  return _call(kernel, x_BxK, w_Fx2xK, [norm_scale_K] if norm_scale_K is not None else [], n=f, k=k,
               block_n=block_n, block_k=block_k, method=method, num_warps=num_warps, num_stages=num_stages,
               interpret=interpret, name="gemv_swiglu")
