"""What the attention benchmarks share besides timing: one forward+backward call, the error of a
result against its reference, and one device's ring pass without communication."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from parallel.attention.ring import Ring, block_bwd, block_fwd, empty_result


def fwd_bwd(fn, q, k, v, cot):
  """(output, dq, dk, dv) of `fn(q, k, v)` for the cotangent `cot` of the output."""
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(cot))


def rel_err(a, b) -> float:
  """Relative Frobenius error of `a` against `b`, in float32."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def ring_pass(ring: Ring, me: int, rows, q, ks, vs, group: int = 1, segments=None):
  """Forward and backward of one device's ring pass, as a custom VJP over the N steps; `rows`
  [N, L] holds each position's original token indices, `segments` ([N, L] int) their segment ids
  or None. `group` > 1 (an experiment, not what the
  ring does): after my own block, that many arriving blocks are concatenated into one call (for
  device 0 under zigzag every other block is a later one, so they take the same sub-block)."""
  n, length = ks.shape[0], ks.shape[2]
  order = [(me - s) % n for s in range(n)]
  groups = [order[:1]] + [order[i:i + group] for i in range(1, n, group)]
  cat = lambda x, g: jnp.concatenate([x[s] for s in g], axis=1)
  seg = lambda g: None if segments is None else jnp.asarray(segments[g].reshape(1, -1))
  block = lambda ks, vs, g: (cat(ks, g), cat(vs, g), seg(g), jnp.asarray(rows[g].reshape(-1)))
  q_seg = seg([me])

  @jax.custom_vjp
  def attend(q, ks, vs):
    return forward(q, ks, vs)[0]

  def forward(q, ks, vs):
    o, lse = empty_result(q)
    for g in groups:
      o, lse = block_fwd(ring, q, q_seg, jnp.asarray(rows[me]), block(ks, vs, g), o, lse)
    return o.astype(q.dtype), lse

  def fwd(q, ks, vs):
    o, lse = forward(q, ks, vs)
    return o, (q, ks, vs, o, lse)

  def bwd(res, do):
    q, ks, vs, o, lse = res
    dq, dks, dvs = jnp.zeros(q.shape, jnp.float32), [None] * n, [None] * n
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    for g in groups:
      zeros = jnp.zeros((ks.shape[1], length * len(g), *ks.shape[3:]), jnp.float32)
      dq, dk, dv = block_bwd(ring, q, q_seg, jnp.asarray(rows[me]), block(ks, vs, g), o, lse, delta, do,
                             (dq, zeros, zeros))
      for j, src in enumerate(g):
        dks[src], dvs[src] = dk[:, j * length:(j + 1) * length], dv[:, j * length:(j + 1) * length]
    return dq.astype(q.dtype), jnp.stack(dks).astype(ks.dtype), jnp.stack(dvs).astype(vs.dtype)

  attend.defvjp(fwd, bwd)
  return attend(q, ks, vs)
