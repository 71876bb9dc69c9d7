"""Ring attention: key/value blocks travel around the `seq` devices while each device's queries stay.

Papers: Li et al., "Sequence Parallelism: Long Sequence Training from System Perspective" (Ring
Self-Attention); Liu et al., "Ring Attention with Blockwise Transformers"; causal load balance by
the zigzag split (Ring Flash Attention) or the striped one (Brandon et al., "Striped Attention").

Shapes and sharding: q [B, L, H, D], k and v [B, L, K, D], segment ids [B, L] or None; L split over
`axis` in `layout` order (`layout.py`), B over `batch_axes`, heads over `head_axes`. Output
[B, L, H, D] laid out as q.

Communication, per device and pass: n - 1 `ppermute`s of one K/V block (+ its segment ids) to the
next device, each issued before the current block's compute so the two can overlap. Partial
results merge by their float32 log-sum-exp. The backward is a `jax.custom_vjp` over the whole
ring: K/V make the same trip again, and their gradients travel with them and arrive home after
one more hop, so no received block is kept alive for the backward (autodiff through the loop
would store all n of them, and through a fused kernel would drop the LSE's gradient).

Work per step under causal masking: with `zigzag` every device computes the same share at every
step (its own block: causal in its local order; an earlier position's block: all queries against
the block's first chunk; a later one's: the second query chunk against the whole block).
`contiguous` skips blocks wholly in the future, which leaves the device holding the sequence's
end with n times the work of the first. `striped` computes every block with a causal mask
(strictly causal for blocks from later positions).

Blocks run as plain XLA masked by original index and segment ids (`implementation="xla"`, any
backend) or as fused kernel calls (`"cudnn"`: `cudnn_blocks.py`, flash attention on NVIDIA GPUs;
`"xla_kernels"`: their XLA twins, `xla_kernels.py`, which run the same routes on any backend),
whose backward takes the final output and LSE. With segment ids (packed documents) the kernel
calls go through `documents.py` (causal zigzag or contiguous layout; documents numbered in
order, as packing writes them); striped or non-causal rings with segment ids run XLA blocks.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from parallel.attention import cudnn_blocks, documents, xla_kernels
from parallel.attention.blockwise import F32, NEG, attention_mask, block_backward, block_forward, merge
from parallel.attention.context import check_inputs, shard_attention


@dataclasses.dataclass(frozen=True)
class Ring:
  """A ring over `size` positions of `axis`, neighbouring positions `stride` axis indices apart
  (one device per position for ring attention; one group of Ulysses devices per position for USP)."""

  axis: str
  size: int  # positions on the ring
  stride: int  # axis indices between neighbouring positions
  layout: str
  scale: float
  kernels: Any = None  # a fused-kernel module (`block_kernels`), or None for masked XLA blocks
  causal: bool = True  # False: every query sees every key (no load balance needed)

  @property
  def fused(self) -> bool:
    return self.kernels is not None

  def shift(self, n_axis: int) -> list[tuple[int, int]]:
    """ppermute pairs sending each device's block to the same slot of the next position."""
    return [(i, (i + self.stride) % n_axis) for i in range(n_axis)]


def empty_result(q: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A float32 output of zeros and an LSE of `NEG` shaped for `q`'s rows; like `q`, they vary over
  the mesh axes (a scan carry and every switch branch must agree on that)."""
  return jnp.zeros_like(q, F32), jnp.full_like(q[..., 0], NEG, F32)


def sub_blocks(ring: Ring, local_length: int) -> list[tuple[slice, slice, bool] | None]:
  """Per case (see `case`): which query rows meet which key rows, and whether the mask between
  them is causal on their local order (else none); None computes nothing. The XLA path masks by
  original indices and segment ids instead, which agrees wherever both apply."""
  every, half, layout = slice(None), local_length // 2, ring.layout
  if not ring.causal:
    return [(every, every, False)]
  if layout == "zigzag":  # my own block (its local order is causal), an earlier block, a later one
    return [(every, every, True), (every, slice(0, half), False), (slice(half, None), every, False)]
  if layout == "contiguous":
    return [(every, every, True), (every, every, False), None]
  # striped: token j of position p is j*n + p, so a block from a later position is strictly
  # causal (query j sees keys < j): shift by one row.
  return [(every, every, True), (slice(1, None), slice(0, local_length - 1), True)]


def case(ring: Ring, q_index: jax.Array, kv_index: jax.Array) -> jax.Array:
  """Which sub-blocks apply, from the first original index of each block (which orders the
  positions in every layout). zigzag, contiguous: 0 my own block, 1 an earlier position's, 2 a
  later one's; striped: 0 a position at or before mine, 1 a later one; not causal: 0."""
  mine, theirs = q_index[0], kv_index[0]
  if not ring.causal:
    return jnp.zeros((), jnp.int32)
  if ring.layout == "striped":
    return (theirs > mine).astype(jnp.int32)
  return jnp.where(theirs == mine, 0, jnp.where(theirs < mine, 1, 2)).astype(jnp.int32)


KERNELS = {"xla": None, "cudnn": cudnn_blocks, "xla_kernels": xla_kernels}


def block_kernels(implementation: str):
  """The fused-kernel module an `implementation` runs blocks with (None: masked XLA blocks)."""
  if implementation not in KERNELS:
    raise ValueError(f"implementation={implementation!r}: choose one of {tuple(KERNELS)}")
  return KERNELS[implementation]


def kind(ring: Ring, segment_ids) -> str:
  """How blocks run: "kernel" (fused, no segment ids), "documents" (fused with segment ids, where
  `documents.py` applies) or "xla"."""
  if not ring.fused:
    return "xla"
  if segment_ids is None:
    return "kernel"
  return "documents" if ring.causal and ring.layout != "striped" else "xla"


def check_documents(name: str, ring: Ring, segment_ids) -> None:
  """Where segment ids take the fused route, refuses concrete ones out of document order."""
  if kind(ring, segment_ids) == "documents":
    documents.check_document_order(name, segment_ids, ring.layout, ring.size)


def _rows(x, rows):
  return None if x is None else x[:, rows]


# A sub-block that covers every row updates the whole operand: written as a plain value rather
# than a full-range `.at[:, :]` update. XLA:CPU in JAX 0.11.2 crashes (segmentation fault, while
# compiling) on a `switch` inside a `shard_map` whose branches mix a full-range and a partial
# update of the same operand (bench/xla_cpu_switch_crash.py). The values are the same either way.
def _set_rows(x, rows, value):
  return value if rows == slice(None) else x.at[:, rows].set(value)


def _add_rows(x, rows, value):
  return x + value if rows == slice(None) else x.at[:, rows].add(value)


def block_fwd(ring: Ring, q, q_seg, q_index, kv, o, lse) -> tuple[jax.Array, jax.Array]:
  """My queries' float32 output and LSE `(o, lse)` after merging in one key/value block
  kv = (k, v, segment ids or None, original indices [Lk]). Each case merges into the rows it
  touches only, in place: no padded temporaries."""
  k, v, kv_seg, kv_index = kv

  def branch(rows):
    def run(o, lse):
      if rows is None:
        return o, lse
      qr, kr, causal = rows
      how, kernels = kind(ring, q_seg), ring.kernels
      if how == "kernel":
        ob, lb = kernels.block_forward(q[:, qr], k[:, kr], v[:, kr], causal, ring.scale)
      elif how == "documents" and causal:  # my own block (same tokens on both sides)
        ob, lb = documents.own_forward(kernels, q[:, qr], k[:, kr], v[:, kr], q_seg[:, qr], ring.scale)
      elif how == "documents":
        ob, lb = documents.earlier_forward(kernels, q[:, qr], k[:, kr], v[:, kr], q_seg[:, qr], kv_seg[:, kr],
                                           ring.scale)
      else:
        mask = attention_mask(q_index[qr], kv_index[kr], _rows(q_seg, qr), _rows(kv_seg, kr), ring.causal)
        ob, lb = block_forward(q[:, qr], k[:, kr], v[:, kr], mask, ring.scale)
      om, lm = merge(o[:, qr], lse[:, qr], ob.astype(F32), lb)
      return _set_rows(o, qr, om), _set_rows(lse, qr, lm)
    return run

  branches = [branch(rows) for rows in sub_blocks(ring, q.shape[1])]
  return jax.lax.switch(case(ring, q_index, kv_index), branches, o, lse)


def block_bwd(ring: Ring, q, q_seg, q_index, kv, o, lse, delta, do, grads):
  """The float32 gradients `grads = (dq, dk, dv)` plus one key/value block's share (as in
  `block_fwd`), given my queries' final output `o`, LSE and delta = sum(dO * O, -1)."""
  k, v, kv_seg, kv_index = kv

  def branch(rows):
    def run(dq, dk, dv):
      if rows is None:
        return dq, dk, dv
      qr, kr, causal = rows
      how, kernels = kind(ring, q_seg), ring.kernels
      final = None if o is None else (o[:, qr], lse[:, qr], do[:, qr])  # fused kernels only (TokenRing sends o then)
      if how == "kernel":
        bq, bk, bv = kernels.block_backward(q[:, qr], k[:, kr], v[:, kr], causal, ring.scale, *final)
      elif how == "documents" and causal:
        bq, bk, bv = documents.own_backward(kernels, q[:, qr], k[:, kr], v[:, kr], q_seg[:, qr], ring.scale, *final)
      elif how == "documents":
        bq, bk, bv = documents.earlier_backward(kernels, q[:, qr], k[:, kr], v[:, kr], q_seg[:, qr], kv_seg[:, kr],
                                                ring.scale, *final)
      else:
        mask = attention_mask(q_index[qr], kv_index[kr], _rows(q_seg, qr), _rows(kv_seg, kr), ring.causal)
        bq, bk, bv = block_backward(q[:, qr], k[:, kr], v[:, kr], mask, ring.scale, lse[:, qr], delta[:, qr],
                                    do[:, qr])
      return _add_rows(dq, qr, bq), _add_rows(dk, kr, bk), _add_rows(dv, kr, bv)
    return run

  branches = [branch(rows) for rows in sub_blocks(ring, q.shape[1])]
  return jax.lax.switch(case(ring, q_index, kv_index), branches, *grads)


def ring_forward(ring: Ring, q, k, v, segment_ids, index) -> tuple[jax.Array, jax.Array]:
  """(float32 output, float32 LSE) of my queries against every position's keys and values."""
  shift = ring.shift(jax.lax.axis_size(ring.axis))
  o, lse = empty_result(q)

  def body(carry, _):
    o, lse, kv = carry
    arriving = jax.lax.ppermute(kv, ring.axis, shift)  # issued before the compute
    o, lse = block_fwd(ring, q, segment_ids, index, kv, o, lse)
    return (o, lse, arriving), None

  (o, lse, kv), _ = jax.lax.scan(body, (o, lse, (k, v, segment_ids, index)), None, length=ring.size - 1)
  return block_fwd(ring, q, segment_ids, index, kv, o, lse)


def ring_backward(ring: Ring, q, k, v, segment_ids, index, o, lse, do):
  """(dq, dk, dv) in the inputs' dtypes: K/V and their gradients go round once more."""
  shift = ring.shift(jax.lax.axis_size(ring.axis))
  delta = jnp.sum(do.astype(F32) * o.astype(F32), axis=-1)

  def step(dq, kv, dkv):
    dq, dk, dv = block_bwd(ring, q, segment_ids, index, kv, o, lse, delta, do, (dq, *dkv))
    return dq, (dk, dv)

  def body(carry, _):
    dq, kv, dkv = carry
    arriving = jax.lax.ppermute(kv, ring.axis, shift)
    dq, dkv = step(dq, kv, dkv)
    return (dq, arriving, jax.lax.ppermute(dkv, ring.axis, shift)), None

  zeros = lambda x: jnp.zeros_like(x, F32)
  init = (zeros(q), (k, v, segment_ids, index), (zeros(k), zeros(v)))
  (dq, kv, dkv), _ = jax.lax.scan(body, init, None, length=ring.size - 1)
  dq, dkv = step(dq, kv, dkv)
  dk, dv = jax.lax.ppermute(dkv, ring.axis, shift)  # the last hop home
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def ring_custom_vjp(forward, backward):
  """A local op whose VJP spans a whole ring: `forward(ring, q, k, v, segment_ids, index)` gives
  the float32 output and LSE; `backward(ring, q, k, v, segment_ids, index, o, lse, do)` the
  gradients of q, k and v from them. Only q, k, v, the indices and the output and LSE are kept."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def core(ring: Ring, q, k, v, segment_ids, index):
    return forward(ring, q, k, v, segment_ids, index)[0].astype(q.dtype)

  def fwd(ring, q, k, v, segment_ids, index):
    o, lse = forward(ring, q, k, v, segment_ids, index)
    o = o.astype(q.dtype)
    return o, (q, k, v, segment_ids, index, o, lse)

  def bwd(ring, residuals, do):
    return (*backward(ring, *residuals, do), None, None)

  core.defvjp(fwd, bwd)
  return core


# Local ring attention inside `shard_map`. `index`: the original position of each local token
# ([L/n] int32); blocks carry theirs around the ring.
ring_core = ring_custom_vjp(ring_forward, ring_backward)


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None, *, mesh: Mesh,
                   axis: str = "seq", layout: str = "zigzag", batch_axes: Sequence[str] = (),
                   head_axes: Sequence[str] = (), implementation: str = "xla", causal: bool = True) -> jax.Array:
  """Causal (and, with segment ids, document-masked) GQA attention with the sequence split over
  `axis` in `layout` order; see the module docstring for sharding and communication.
  `causal=False`: every query sees every key (of its document).
  `implementation`: "xla" (masked XLA blocks, any backend), "cudnn" (a cuDNN flash-attention call
  per block: NVIDIA GPUs, bf16/fp16) or "xla_kernels" (the cuDNN calls' XLA twins). With a kernel,
  segment ids must number documents in order, as packing does (`documents.py`)."""
  return run_on_ring("ring_attention", ring_core, q, k, v, segment_ids, mesh=mesh, axis=axis, layout=layout,
                     batch_axes=batch_axes, head_axes=head_axes, implementation=implementation, causal=causal)


def run_on_ring(name: str, core, q, k, v, segment_ids, *, mesh: Mesh, axis: str, layout: str,
                batch_axes: Sequence[str], head_axes: Sequence[str], implementation: str, causal: bool = True):
  """Checks the inputs, then runs `core(ring, q, k, v, segment_ids, index)` (a `ring_custom_vjp`
  op) on every device's blocks, over a ring of all of `axis`'s devices."""
  check_inputs(name, q, k, v, segment_ids, mesh=mesh, axis=axis, layout=layout, batch_axes=batch_axes,
               head_axes=head_axes)
  ring = Ring(axis=axis, size=mesh.shape[axis], stride=1, layout=layout, scale=q.shape[-1] ** -0.5,
              kernels=block_kernels(implementation), causal=causal)
  check_documents(name, ring, segment_ids)
  return shard_attention(functools.partial(core, ring), q, k, v, segment_ids, mesh=mesh, axis=axis,
                         layout=layout, batch_axes=batch_axes, head_axes=head_axes)
