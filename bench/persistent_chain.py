"""One resident Pallas (Triton) kernel for a decode step's layer products: the experiment behind
the batch-1 bandwidth goal, measured by `bench/decode_kernels.py --persistent` (BENCHMARKS.md).

`bench/decode_kernels.py` found that a kernel streaming one of a `1b` layer's weights spends about
6 us starting and draining besides streaming it, so a step of 16 layers x 4+ products cannot reach
60% of HBM however fast each product streams. This kernel is launched once for all the layers:
`programs` programs (at most one per SM, so all are resident together) split every product's
outputs evenly and meet at a grid barrier between products (an atomic counter in global memory
that each program raises, then polls). Before a program waits at a barrier it has already issued
the loads of its first weight block of the next product: weights do not depend on the activations,
so the weight stream need not stop at a barrier.

The chain is `decode_kernels.py`'s (attention left out; the first D outputs of q/k/v stand in for
its output), for every layer i:

  y = norm(x) @ wq[i]            [R, Q]   (fused q/k/v)
  h = x + y[:, :D] @ wo[i]       [R, D]
  a = swiglu(norm(h) @ wgu[i])   [R, F]   (gate and up of one [F, 2, D] weight)
  x = h + a @ wd[i]              [R, D]

with one RMSNorm scale g for every norm. Weights are output-major and stacked over layers: wq
[L, Q, D], wo [L, D, D], wgu [L, F, 2, D], wd [L, D, F]. Each output block of `block_n` columns
is summed over K in `block_k` chunks as `pallas_gemv`'s "fma" kernel does (each row of x on its
own, float32), and each product's outputs are rounded to x's dtype as XLA's products are.

Activations live in global memory (the kernel's extra outputs) and are read with volatile loads
(past L1), since other programs wrote them. A barrier: every thread's stores are done (`debug_barrier`), one atomic
add (acquire-release, GPU scope) raises the counter, the program polls it with volatile loads until
all programs have arrived, and an atomic add of 0 acquires what they wrote.

`interpret=True` runs it on CPUs with `programs=1` (a program that waited for another would wait
forever: the interpreter runs programs one after another).

Status (BENCHMARKS.md, "The resident kernel, tried"): on an H100 a first version ran without any
barrier (Pallas pruned its unused atomics and poll loop) and raced; with the barrier kept alive it
hung even with one program over two layers. The Triton IR it lowered to (read on a CPU machine
by lowering for CUDA) showed why: the counter's atomic adds were `fadd`s. JAX 0.10's lowering
picks an atomic add's kind from the value's MLIR type, and a tensor of int32 (the shape-(1,) add
it was given) is not an integer type, so it added 1 as a float to the counter's bits, a denormal
flushed to 0: the counter never moved. JAX 0.12.1's lowering looks at the element type. The
barrier now adds scalars, which lower to integer adds on every version; this fix has not run on a
GPU yet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

F32 = jnp.float32


def _triton():
  from jax.experimental.pallas import triton as plt  # noqa: PLC0415 - only where a kernel is built

  return plt


def _barrier(count_ref, seen_ref, pid, target, *, interpret: bool):
  """Wait until the counter reaches `target` (= programs x barriers passed so far, this one included).
  (The interpreter has no threads to synchronise: no `debug_barrier` there.)

  What the atomics return and what the poll saw are stored (`seen_ref`, one entry per program), so
  that no pruning of unused results can drop them. (A first diagnosis blamed such pruning for a
  counter that stayed 0 on an H100; the float add described below explains that reading too.)"""
  plt = _triton()
  one = pl.ds(0, 1)
  sync = (lambda: None) if interpret else plt.debug_barrier
  sync()  # every thread of this program has stored its outputs
  # Scalar index and value: JAX 0.10's Triton lowering picks the atomic's kind from the value's
  # type, and for a tensor of int32 (shape (1,)) it emitted a *floating-point* add on the counter's
  # bits, which never counts up (1 read as a float is a denormal, flushed to 0).
  before = plt.atomic_add(count_ref, jnp.zeros((), jnp.int32), jnp.ones((), jnp.int32))
  seen = lambda: plt.load(count_ref.at[one], volatile=True)[0]
  polled = jax.lax.while_loop(lambda c: c < target, lambda c: seen(), seen())
  after = plt.atomic_add(count_ref, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))  # acquire the others' stores
  seen_ref[pl.ds(pid, 1)] = jnp.full((1,), jnp.maximum(jnp.maximum(before + 1, polled), after), jnp.int32)
  sync()


def _read(ref, r: int, cols) -> jax.Array:
  """Row r, columns `cols` of an activation other programs wrote, as float32 [1, len(cols)]. Volatile:
  not from this SM's L1, which may hold the row as it was before they wrote it. (`.cg` would say
  the same; Pallas' Triton lowering of JAX 0.10-0.12 rejects every cache modifier by name.)"""
  return _triton().load(ref.at[pl.ds(r, 1), cols], volatile=True).astype(F32)


class _Chain:
  """The kernel body's pieces, with the static sizes bound."""

  def __init__(self, *, rows, d, q, f, programs, block_n, block_k, eps, dtype, interpret):
    self.interpret = interpret
    self.rows, self.d, self.q, self.f = rows, d, q, f
    self.programs, self.block_n, self.block_k, self.eps, self.dtype = programs, block_n, block_k, eps, dtype

  def barrier(self, count_ref, target) -> None:
    _barrier(count_ref, self.seen_ref, self.pid, target, interpret=self.interpret)

  def block(self, n: int, j):
    """This program's j-th block of the outputs of a product with n (a contiguous share each)."""
    per = n // self.block_n // self.programs
    return pl.ds(pl.multiple_of((self.pid * per + j) * self.block_n, self.block_n), self.block_n)

  def stage(self, n: int, load, compute, first) -> None:
    """compute(cols, weights) for each of this program's blocks of n outputs, in a loop that issues
    the next block's weight loads before it computes the current block (`first`: block 0's weights,
    loaded before the barrier that opened this product)."""
    per = n // self.block_n // self.programs

    def body(j, ws):
      following = load(self.block(n, jnp.minimum(j + 1, per - 1)))
      compute(self.block(n, j), ws)
      return following

    jax.lax.fori_loop(0, per, body, first)

  def chunks(self, k: int):
    return [pl.ds(c * self.block_k, self.block_k) for c in range(k // self.block_k)]

  def load(self, w_ref, layer, cols_out, k: int, middle=None):
    """Layer `layer`'s weight block [block_n, block_k] per chunk of K (loads issued, values not yet
    used). One indexer per load: Triton's lowering takes no view of a view."""
    at = (lambda c: w_ref[layer, cols_out, c]) if middle is None else (lambda c: w_ref[layer, cols_out, middle, c])
    return tuple(at(c) for c in self.chunks(k))

  def inv_rms(self, src_ref, r: int) -> jax.Array:
    ss = sum(jnp.sum(jnp.square(_read(src_ref, r, c))) for c in self.chunks(self.d))
    return jax.lax.rsqrt(ss / self.d + self.eps)

  def product(self, ws, src_ref, r: int, k: int, g_ref=None, inv=None) -> jax.Array:
    """sum over K of w [block_n, K] * x[r] (normalised when `inv` is given) -> [1, block_n] float32."""
    acc = None
    for w, cols in zip(ws, self.chunks(k)):
      x = _read(src_ref, r, cols)
      if inv is not None:  # RMSNorm, rounded to x's dtype as models.layers.rms_norm returns it
        x = (x * inv * g_ref[cols].astype(F32)[None, :]).astype(self.dtype).astype(F32)
      t = w.astype(F32) * x
      acc = t if acc is None else acc + t
    return jnp.sum(acc, axis=1)[None, :].astype(self.dtype).astype(F32)  # XLA's product rounds here

  def store(self, ref, r: int, cols, value) -> None:
    ref[pl.ds(r, 1), cols] = value.astype(self.dtype)


def _kernel(x0_ref, g_ref, wq_ref, wo_ref, wgu_ref, wd_ref, count0_ref, x_ref, y_ref, h_ref, a_ref, count_ref,
            seen_ref, *, c: _Chain, layers: int):
  del x0_ref, count0_ref  # aliased to x_ref and count_ref
  d, q, f, p = c.d, c.q, c.f, c.programs
  rows = range(c.rows)
  c.pid = pl.program_id(0)  # read once, outside the loop over layers
  c.seen_ref = seen_ref

  def layer(i, first_q):
    base = 4 * i * p  # the counter's value when this layer starts
    load_q = lambda cols: c.load(wq_ref, i, cols, d)
    load_o = lambda cols: c.load(wo_ref, i, cols, d)
    load_gu = lambda cols: (c.load(wgu_ref, i, cols, d, 0), c.load(wgu_ref, i, cols, d, 1))
    load_d = lambda cols: c.load(wd_ref, i, cols, f)

    inv = [c.inv_rms(x_ref, r) for r in rows]

    def qkv(cols, ws):
      for r in rows:
        c.store(y_ref, r, cols, c.product(ws, x_ref, r, d, g_ref, inv[r]))

    c.stage(q, load_q, qkv, first_q)
    first = load_o(c.block(d, 0))
    c.barrier(count_ref, base + p)

    def out(cols, ws):
      for r in rows:
        c.store(h_ref, r, cols, _read(x_ref, r, cols) + c.product(ws, y_ref, r, d))

    c.stage(d, load_o, out, first)
    first = load_gu(c.block(f, 0))
    c.barrier(count_ref, base + 2 * p)

    inv = [c.inv_rms(h_ref, r) for r in rows]

    def gate_up(cols, ws):
      for r in rows:
        gate, up = (c.product(w, h_ref, r, d, g_ref, inv[r]) for w in ws)
        c.store(a_ref, r, cols, gate * jax.nn.sigmoid(gate) * up)

    c.stage(f, load_gu, gate_up, first)
    first = load_d(c.block(d, 0))
    c.barrier(count_ref, base + 3 * p)

    def down(cols, ws):
      for r in rows:
        c.store(x_ref, r, cols, _read(h_ref, r, cols) + c.product(ws, a_ref, r, f))

    c.stage(d, load_d, down, first)
    following = c.load(wq_ref, jnp.minimum(i + 1, layers - 1), c.block(q, 0), d)  # the next layer's
    c.barrier(count_ref, base + 4 * p)
    return following

  jax.lax.fori_loop(0, layers, layer, c.load(wq_ref, 0, c.block(q, 0), d))


def chain(x_RxD: jax.Array, g_D: jax.Array, wq_LxQxD: jax.Array, wo_LxDxD: jax.Array, wgu_LxFx2xD: jax.Array,
          wd_LxDxF: jax.Array, *, programs: int = 128, block_n: int = 4, block_k: int = 512, num_warps: int = 4,
          eps: float = 1e-6, interpret: bool = False, return_count: bool = False) -> jax.Array:
  """x after every layer of the chain (module docstring), in x's dtype, from one kernel launch
  (with `return_count`, also the barrier counter's final value: programs x 4 x layers).

  Every product's outputs must split into blocks of `block_n` that split evenly over `programs`,
  and `block_k` must divide D and F. `programs` must not exceed the SMs (all must be resident)."""
  (rows, d), (layers, q, _) = x_RxD.shape, wq_LxQxD.shape
  f = wd_LxDxF.shape[2]
  want = {"wq": (layers, q, d), "wo": (layers, d, d), "wgu": (layers, f, 2, d), "wd": (layers, d, f), "g": (d,)}
  for name, a in zip(want, (wq_LxQxD, wo_LxDxD, wgu_LxFx2xD, wd_LxDxF, g_D)):
    if a.shape != want[name]:
      raise ValueError(f"persistent chain: {name} must be {want[name]}, got {a.shape}")
  if q < d:
    raise ValueError(f"persistent chain: q/k/v width {q} is below D={d} (its first D outputs feed wo)")
  for name, n in (("q/k/v", q), ("D", d), ("F", f)):
    if n % (block_n * programs):
      raise ValueError(f"persistent chain: {name}={n} does not split into blocks of block_n={block_n} "
                       f"over programs={programs}")
  for name, k in (("D", d), ("F", f)):
    if k % block_k:
      raise ValueError(f"persistent chain: block_k={block_k} must divide {name}={k}")
  if interpret and programs != 1:
    raise ValueError("persistent chain: interpret=True runs programs one after another, so programs must be 1")
  c = _Chain(rows=rows, d=d, q=q, f=f, programs=programs, block_n=block_n, block_k=block_k, eps=eps,
             dtype=x_RxD.dtype, interpret=interpret)
  act = lambda n: jax.ShapeDtypeStruct((rows, n), x_RxD.dtype)
  count = jax.ShapeDtypeStruct((1,), jnp.int32)
  out_shape = (act(d), act(q), act(d), act(f), count, jax.ShapeDtypeStruct((programs,), jnp.int32))
  params = None if interpret else _triton().CompilerParams(num_warps=num_warps, num_stages=1)
  out = pl.pallas_call(functools.partial(_kernel, c=c, layers=layers), out_shape=out_shape, grid=(programs,),
                       input_output_aliases={0: 0, 6: 4}, interpret=interpret, compiler_params=params)(
                           x_RxD, g_D, wq_LxQxD, wo_LxDxD, wgu_LxFx2xD, wd_LxDxF, jnp.zeros((1,), jnp.int32))
  return (out[0], out[4][0]) if return_count else out[0]


def chain_reference(x_RxD, g_D, wq_LxQxD, wo_LxDxD, wgu_LxFx2xD, wd_LxDxF, *, eps: float = 1e-6) -> jax.Array:
  """The same chain in jnp on the same output-major weights (products rounded to x's dtype)."""
  from models.layers import rms_norm, swiglu  # noqa: PLC0415

  dot = lambda x, w: jnp.einsum("rk,nk->rn", x, w, preferred_element_type=F32).astype(x.dtype)
  x = x_RxD
  for i in range(wq_LxQxD.shape[0]):
    y = dot(rms_norm(x, g_D, eps), wq_LxQxD[i])
    h = x + dot(y[:, :x.shape[1]], wo_LxDxD[i])
    n = rms_norm(h, g_D, eps)
    a = swiglu(dot(n, wgu_LxFx2xD[i, :, 0]), dot(n, wgu_LxFx2xD[i, :, 1]))
    x = h + dot(a, wd_LxDxF[i])
  return x
