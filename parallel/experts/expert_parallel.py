"""Expert parallelism (GShard, Lepikhin et al. 2020; DeepSpeed-MoE; Megatron-Core) with expert-tensor
parallelism, MoE Parallel Folding (Liu et al. 2025) and chunked overlap (Tutel, Hwang et al. 2023;
FSMoE; Comet), inside one `jax.shard_map`.

Sharding in and out (n_ep = product of the expert axes, n_et = product of the expert-tensor axes):
  x [T, D], weights/experts [T, K]  rows split over the token axes (the batch's axes, then `seq`)
                                    and then over every expert axis that does not split them yet:
                                    each device dispatches its own share of the tokens
  w_gate, w_up [E, D, F]            E over the expert axes, F over the expert-tensor axes
  w_down [E, F, D]                  E over the expert axes, F over the expert-tensor axes
  y [T, D]                          as x; dropped pairs: a replicated scalar
Folding is just which axes these are (e.g. experts over data x seq x expert while attention uses
`seq` for its context): the plan's rule tables choose them, the op takes them as arguments.

Per device and chunk (`chunks` equal slices of the device's tokens, unrolled so that XLA may
overlap one chunk's all-to-all with another's expert matmuls):
  capacity  GShard slots [E, C, D] (C from the chunk's tokens: a dispatch group is a device's
            chunk) -> all_to_all over the expert axes -> [E/n_ep, n_ep*C, D] batched matmuls ->
            all_to_all back -> weighted combine. Fixed sizes; drops counted.
  dropless  pairs sorted by expert, so by destination device; then either
    padded  (CPU and everywhere) a fixed buffer of B = T_c * min(K, E/n_ep) rows per destination:
            no device can receive more pairs from one source than that bound, since a token picks
            each expert once. Every device sends and receives n_ep * B rows, padding included;
    ragged  (GPU/TPU) `jax.lax.ragged_all_to_all` sends only the real rows (sizes exchanged first
            by a small all_to_all); the receive buffer keeps the same worst-case bound.
  The received rows are sorted by local expert and run through the grouped matmul; padding rows
  sort last and come out zero.
Expert-tensor parallelism: each device computes its F slice of every local expert; the partial
outputs are summed over the expert-tensor axes (one psum of [T_device, D] per layer).

Inside a `shard_map` already manual over some expert axes (a pipeline stage: manual over `stage`
and the batch axes), the tokens are the shard's and the expert weights arrive whole: each device
slices its experts, and the op maps only over the axes that are not manual yet.

Communicated per chunk: two all_to_alls of the dispatched rows over the expert axes (capacity:
n_ep * E/n_ep * C rows; padded: n_ep * B; ragged: the real rows), and the psum over the
expert-tensor axes. Gradients flow through the same collectives (their transposes).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec as P

from configs.base import EXPERT_DISPATCHES
from parallel.experts.capacity import capacity, capacity_slots, combine_slots, gather_slots
from parallel.experts.dropless import gather_tokens, sort_pairs
from parallel.experts.permute import inverse_permutation, permute_rows
from parallel.experts.ffn import batched_ffn, check_expert_args, grouped_ffn
from parallel.experts.grouped_matmul import resolve
from parallel.experts.rounds import RowMaps, rounds_ffn

ALL_TO_ALLS = ("padded", "ragged")


def resolve_all_to_all(kind: str, backend: str | None = None) -> str:
  """`auto` -> `ragged` on GPU/TPU, `padded` on CPU (XLA:CPU has no ragged all-to-all)."""
  if kind == "auto":
    return "padded" if (backend or jax.default_backend()) == "cpu" else "ragged"
  if kind not in ALL_TO_ALLS:
    raise ValueError(f"all_to_all={kind!r}: choose one of {('auto', *ALL_TO_ALLS)}")
  return kind


def _a2a(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """Block i of the leading dimension (one per device of `axes`) to device i; blocks received in
  source order."""
  return jax.lax.all_to_all(x, axes, 0, 0, tiled=False) if axes else x


def _capacity_chunk(x, w, e, wg, wu, wd, *, n_experts, axes, n_ep, factor):
  t, d = x.shape
  local, c = n_experts // n_ep, capacity(t, e.shape[1], n_experts, factor)
  slot, dropped = capacity_slots(e, n_experts, c)
  # Slot e * C + p, with e = device * local + local expert: the leading split is the destination.
  recv = _a2a(gather_slots(x, slot, n_experts * c).reshape(n_ep, local * c, d), axes)
  slots = recv.reshape(n_ep, local, c, d).transpose(1, 0, 2, 3).reshape(local, n_ep * c, d)
  out = batched_ffn(slots, wg, wu, wd).reshape(local, n_ep, c, d).transpose(1, 0, 2, 3)
  back = _a2a(out.reshape(n_ep, local * c, d), axes).reshape(n_experts * c, d)
  return combine_slots(back, slot, w), dropped


def _run_local(rows, ids, local, wg, wu, wd, impl, expected_rows):
  """Received rows with local expert ids (`local` marks padding) -> outputs in received order.
  `expected_rows`: the real rows a device receives under balanced routing (sizes the rounds' slots)."""
  order, sizes = sort_pairs(ids[:, None], local)
  inverse = inverse_permutation(order)
  if resolve(impl) == "rounds":  # the slots read and write the received rows directly
    maps = RowMaps(src=order, src_users=inverse[:, None], dst=order, dst_src=inverse)
    return rounds_ffn(rows, sizes, wg, wu, wd, batched_ffn, expected_rows=expected_rows, maps=maps)
  out = grouped_ffn(permute_rows(rows, order, inverse), sizes, wg, wu, wd, impl, expected_rows=expected_rows)
  return permute_rows(out, inverse, order)


def _dropless_padded_chunk(x, w, e, wg, wu, wd, *, n_experts, axes, n_ep, impl):
  (t, d), k = x.shape, e.shape[1]
  local, pairs = n_experts // n_ep, t * e.shape[1]
  bound = t * min(k, local)
  order, sizes = sort_pairs(e, n_experts)
  e_sorted = e.reshape(-1)[order]
  dest_sizes = sizes.reshape(n_ep, local).sum(1)
  dest = e_sorted // local
  slot_sorted = dest * bound + jnp.arange(pairs, dtype=jnp.int32) - (jnp.cumsum(dest_sizes) - dest_sizes)[dest]
  slot = jnp.zeros((pairs,), jnp.int32).at[order].set(slot_sorted).reshape(t, k)
  send = gather_slots(x, slot, n_ep * bound).reshape(n_ep, bound, d)
  ids = jnp.full((n_ep * bound,), local, jnp.int32).at[slot_sorted].set(e_sorted % local).reshape(n_ep, bound)
  rows, rids = _a2a(send, axes).reshape(-1, d), _a2a(ids, axes).reshape(-1)
  out = _run_local(rows, rids, local, wg, wu, wd, impl, t * k)
  back = _a2a(out.reshape(n_ep, bound, d), axes).reshape(-1, d)
  return combine_slots(back, slot, w), jnp.zeros((), jnp.float32)


def _dropless_ragged_chunk(x, w, e, wg, wu, wd, *, n_experts, axes, n_ep, impl):
  (t, d), k = x.shape, e.shape[1]
  local = n_experts // n_ep
  order, sizes = sort_pairs(e, n_experts)
  inverse = inverse_permutation(order)
  rows, e_sorted = gather_tokens(x, order, inverse, k), e.reshape(-1)[order]
  send_sizes = sizes.reshape(n_ep, local).sum(1)
  send_offsets = jnp.cumsum(send_sizes) - send_sizes
  exchange = lambda v: _a2a(v.reshape(n_ep, 1), axes).reshape(n_ep)
  recv_sizes = exchange(send_sizes)  # from each source, to me
  recv_offsets = jnp.cumsum(recv_sizes) - recv_sizes  # where each source's rows start in my buffer
  cap = n_ep * t * min(k, local)  # worst case, as the padded path
  ragged = functools.partial(jax.lax.ragged_all_to_all, axis_name=axes)
  there = exchange(recv_offsets)  # where my rows start in each destination's buffer
  recv = ragged(rows, jnp.zeros((cap, d), rows.dtype), send_offsets, send_sizes, there, recv_sizes)
  rids = ragged(e_sorted % local, jnp.full((cap,), local, jnp.int32), send_offsets, send_sizes, there, recv_sizes)
  out = _run_local(recv, rids, local, wg, wu, wd, impl, t * k)
  home = exchange(send_offsets)  # where each source keeps the rows it sent me
  back = ragged(out, jnp.zeros((t * k, d), out.dtype), recv_offsets, recv_sizes, home, send_sizes)
  out_TxKxD = permute_rows(back, inverse, order).reshape(t, k, d)
  y = jnp.einsum("tk,tkd->td", w.astype(jnp.float32), out_TxKxD.astype(jnp.float32))
  return y, jnp.zeros((), jnp.float32)


def _check(mesh, x_TxD, w_gate_ExDxF, token_axes, expert_axes, tensor_axes, dispatch, all_to_all, chunks,
           capacity_factor):
  for name, axes in (("token_axes", token_axes), ("expert_axes", expert_axes), ("tensor_axes", tensor_axes)):
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown:
      raise ValueError(f"{name} {axes}: {unknown} are not axes of the mesh {tuple(mesh.axis_names)}")
  if set(expert_axes) & set(tensor_axes):
    raise ValueError(f"axes {sorted(set(expert_axes) & set(tensor_axes))} are both expert and expert-tensor axes")
  if set(tensor_axes) & set(token_axes):
    raise ValueError(f"expert-tensor axes {tensor_axes} must not split the tokens (token axes {token_axes})")
  if dispatch not in EXPERT_DISPATCHES:
    raise ValueError(f"dispatch={dispatch!r}: choose one of {EXPERT_DISPATCHES}")
  if all_to_all not in ALL_TO_ALLS:
    raise ValueError(f"all_to_all={all_to_all!r}: choose one of {ALL_TO_ALLS}")
  if all_to_all == "ragged" and jax.default_backend() == "cpu":
    raise ValueError("all_to_all='ragged' needs a GPU or TPU (XLA:CPU has no ragged all-to-all); use 'padded'")
  if dispatch == "capacity" and capacity_factor <= 0:
    raise ValueError(f"capacity_factor={capacity_factor} must be > 0")
  (n_experts, _, width), n_tokens = w_gate_ExDxF.shape, x_TxD.shape[0]
  n_ep, n_et = (math.prod(mesh.shape[a] for a in axes) for axes in (expert_axes, tensor_axes))
  if n_experts % n_ep:
    raise ValueError(f"{n_experts} experts do not divide over the expert axes {expert_axes} ({n_ep} devices)")
  if width % n_et:
    raise ValueError(f"expert width {width} does not divide over the expert-tensor axes {tensor_axes} ({n_et} devices)")
  manual = frozenset(getattr(mesh, "manual_axes", ()))  # the caller's arrays are already per shard there
  split = tuple(a for a in dict.fromkeys((*token_axes, *expert_axes)) if a not in manual)
  n_split = math.prod(mesh.shape[a] for a in split)
  if chunks < 1 or n_tokens % (n_split * chunks):
    raise ValueError(f"{n_tokens} tokens do not split into {n_split} devices ({split}) x {chunks} chunks")


def _expert_index(axes: tuple[str, ...]) -> jax.Array:
  """This device's position along `axes` (major to minor), as the all-to-all numbers them."""
  index = jnp.zeros((), jnp.int32)
  for a in axes:
    index = index * jax.lax.axis_size(a) + jax.lax.axis_index(a)
  return index


def expert_parallel_experts(x_TxD: jax.Array, weights_TxK: jax.Array, experts_TxK: jax.Array, w_gate_ExDxF: jax.Array,
                            w_up_ExDxF: jax.Array, w_down_ExFxD: jax.Array, *, mesh: Mesh | AbstractMesh,
                            token_axes: tuple[str, ...] = (), expert_axes: tuple[str, ...] = ("expert",),
                            tensor_axes: tuple[str, ...] = (), dispatch: str = "dropless",
                            capacity_factor: float = 1.25, all_to_all: str = "padded", chunks: int = 1,
                            grouped_matmul: str = "xla", compute_dtype=None) -> tuple[jax.Array, jax.Array]:
  """(y [T, D] in the compute dtype, dropped pairs float32) with the experts split over
  `expert_axes` and their width over `tensor_axes`; see the module docstring.

  Inside a `shard_map` already manual over some of the expert axes (a pipeline stage, manual over
  `stage` and the batch axes, with experts over `data`), the arrays are this shard's: the tokens
  are the shard's own, the expert weights whole (all E), and each device keeps its E / n_ep slice.
  """
  check_expert_args(x_TxD, weights_TxK, experts_TxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
  token_axes, expert_axes, tensor_axes = tuple(token_axes), tuple(expert_axes), tuple(tensor_axes)
  _check(mesh, x_TxD, w_gate_ExDxF, token_axes, expert_axes, tensor_axes, dispatch, all_to_all, chunks,
         capacity_factor)
  manual = frozenset(getattr(mesh, "manual_axes", ()))
  if manual & set(token_axes + tensor_axes):
    raise ValueError(f"token axes {token_axes} and expert-tensor axes {tensor_axes} must not be manual "
                     f"already (manual: {sorted(manual)})")
  dtype = jnp.dtype(compute_dtype or x_TxD.dtype)
  n_experts = w_gate_ExDxF.shape[0]
  n_ep = math.prod(mesh.shape[a] for a in expert_axes)
  slice_here = bool(manual & set(expert_axes))  # the weights arrive whole: take this device's experts
  split = tuple(a for a in dict.fromkeys((*token_axes, *expert_axes)) if a not in manual)
  if dispatch == "capacity":
    chunk_fn = functools.partial(_capacity_chunk, factor=capacity_factor)
  elif all_to_all == "ragged" and n_ep > 1:
    chunk_fn = functools.partial(_dropless_ragged_chunk, impl=grouped_matmul)
  else:
    chunk_fn = functools.partial(_dropless_padded_chunk, impl=grouped_matmul)
  chunk_fn = functools.partial(chunk_fn, n_experts=n_experts, axes=expert_axes, n_ep=n_ep)

  def local(x, w, e, wg, wu, wd):
    if slice_here:
      start = _expert_index(expert_axes) * (n_experts // n_ep)
      wg, wu, wd = (jax.lax.dynamic_slice_in_dim(a, start, n_experts // n_ep) for a in (wg, wu, wd))
    x, wg, wu, wd = (a.astype(dtype) for a in (x, wg, wu, wd))
    ys, drops = [], []
    for xc, wc, ec in zip(*(jnp.split(a, chunks) for a in (x, w, e))):
      y, dropped = chunk_fn(xc, wc, ec, wg, wu, wd)
      ys.append(y.astype(dtype))
      drops.append(dropped)
    y = jnp.concatenate(ys)
    if tensor_axes:  # each device holds its F slice of the experts: partial sums
      y = jax.lax.psum(y, tensor_axes)
    summed = split + tuple(a for a in expert_axes if a in manual)
    dropped = sum(drops)
    return y, (jax.lax.psum(dropped, summed) if summed else dropped)

  inner = frozenset(split + tensor_axes)
  if not inner:
    return local(x_TxD, weights_TxK, experts_TxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
  experts = None if slice_here else (expert_axes or None)
  tokens = P(split or None, None)
  wide = P(experts, None, tensor_axes or None)
  down = P(experts, tensor_axes or None, None)
  # Nested in a manual context (the pipeline executor's, check_vma=False) the inner map is manual
  # over the rest of the axes it uses and follows the outer's check; otherwise over every axis.
  axis_names = inner if manual else frozenset(mesh.axis_names)
  return jax.shard_map(local, mesh=mesh, axis_names=axis_names, in_specs=(tokens, tokens, tokens, wide, wide, down),
                       out_specs=(tokens, P()), check_vma=not manual)(
                           x_TxD, weights_TxK, experts_TxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
