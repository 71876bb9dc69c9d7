"""One SPMD executor for every pipeline schedule: a `scan` over the table's ticks inside a
`shard_map` over `stage`, owning the forward and the backward.

At each tick every stage stores what arrived, does its action (one `switch` on the table: idle, F,
B, W or a combined backward, each with its part's role, first or last, fixed in the branch), and
sends on: activations towards the next part's stage, input gradients towards the previous part's,
by `ppermute` (one neighbour up and, for V-shaped schedules, one down; a V's turn stays on its
stage). The backward is the executor's: each part is re-run under `jax.vjp` from its stored
input; in zero-bubble schedules B takes the input's gradient and keeps each weight matmul's input
and output gradient, and W is those matmuls only (`split_backward.py`); a combined backward takes
both at once. Weight gradients accumulate per stage and chunk (in float32; with one microbatch
each is stored as it comes, in its own dtype). Buffers hold each input and output gradient from
arrival to last use (`buffers.plan_buffers`), sized by the schedule's peak; what B keeps for W
lives in the slot of the part's input, which is held until W.

The model comes in as callables, so `parallel/` knows nothing of `models/`:

  first_fn(first_params, mb_inputs) -> x             the embedding, on the first part's stage
  part_fn(part_params, x, mb_inputs) -> x             one part (a slice of the layer stack)
  last_fn(last_params, x, mb_inputs) -> (loss_sum, count)   the head and loss, on the last part's

`mb_inputs` is one microbatch of `inputs` (every array's leading axis is the microbatch), so each
part can read what it needs (positions, segment ids) without it travelling.

With `vocab` (a `VocabSplit`, `parallel/pipeline/vocab.py`) the embedding and the output layer are
split on the vocabulary over all stages instead: `first_params` and `last_params` come in sliced
over `axis` on their vocabulary dimension, `last_fn(last_params, x, mb_inputs)` returns this
stage's slice of the logits, and every stage joins the ticks where the first part's forward or
backward or the last part's forward runs (a `cond` on the table, the same on every stage).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from parallel.pipeline.buffers import DOWN, LOCAL, UP, plan_buffers
from parallel.pipeline.schedule import BW, IDLE, B, F, W, Schedule
from parallel.pipeline.split_backward import split_backward
from parallel.pipeline.vocab import VocabSplit, head_loss_and_grads, partial_embedding

F32 = jnp.float32


def _shift(p: int, direction: int) -> list[tuple[int, int]]:
  return [(i, (i + direction) % p) for i in range(p)]


def _put(buf: jax.Array, slot: jax.Array, value: jax.Array) -> jax.Array:
  """buf[slot] = value; slot -1 writes to the spare last slot (so there is no branch)."""
  return jax.lax.dynamic_update_index_in_dim(buf, value.astype(buf.dtype), jnp.where(slot < 0, buf.shape[0] - 1, slot), 0)


def _get(buf: jax.Array, slot: jax.Array) -> jax.Array:
  return jax.lax.dynamic_index_in_dim(buf, jnp.maximum(slot, 0), 0, keepdims=False)


def _vjp(fn: Callable, primals: dict, cotangent: Any) -> tuple[Any, dict]:
  """fn(**primals) and the gradients of all primals for `cotangent`: the weights' ("w") in their
  own dtype, the others in float32."""
  keys = list(primals)
  out, vjp = jax.vjp(lambda *vals: fn(**dict(zip(keys, vals))), *primals.values())
  grads = vjp(cotangent)
  return out, {k: g if k == "w" else jax.tree.map(lambda a: a.astype(F32), g) for k, g in zip(keys, grads)}


def _add_at(tree: Any, index: jax.Array, update: Any) -> Any:
  return jax.tree.map(lambda acc, u: acc.at[index].add(u.astype(acc.dtype)), tree, update)


def _set_at(tree: Any, index: jax.Array, update: Any) -> Any:
  return jax.tree.map(lambda acc, u: acc.at[index].set(u.astype(acc.dtype)), tree, update)


def run_pipeline(schedule: Schedule, first_fn: Callable, part_fn: Callable, last_fn: Callable, first_params: Any,
                 part_params: Any, last_params: Any, inputs: Any, *, mesh: Mesh, axis: str = "stage",
                 batch_axes: tuple[str, ...] = (), x_spec: P | None = None, vocab: VocabSplit | None = None) -> tuple:
  """Loss and gradients of a pipelined model.

  Args:
    part_params: every leaf [stages, chunks, ...], split over `axis` on its first dimension;
      [s, c] is the part `schedule.part(s, c)` runs.
    first_params, last_params, inputs: the same on every stage (`inputs` leaves [m, rows, ...]).
    batch_axes: mesh axes the rows of every microbatch are split over (data parallelism). The
      executor is manual over them too: each batch shard runs the whole schedule on its rows,
      accumulates its own gradients, and the gradients are summed over `batch_axes` once, after
      the last tick. Parameters come in whole over these axes (a ZeRO-3 shard is gathered once
      per step, on entry).
    x_spec: how an activation is laid out over the mesh's remaining (automatic) axes, such as
      `tensor`, when it is split over them: every action's outputs and the buffers are pinned
      to it, so that XLA sees one layout for all branches of the per-tick switch.
  Returns (loss_sum, count, d_first_params, d_part_params, d_last_params, stats): float32 scalars,
  gradients of loss_sum laid out like the parameters (float32; the parts' in their parameters'
  dtype when there is one microbatch, so nothing is summed), and what the executor did, counted as it
  ran, per stage ([stages, ...]): `peak_held`, the most activation inputs it held at once, and
  `b_tick` / `w_tick` [stages, m, chunks], the tick of each backward for inputs and for weights.

  Communication per tick: one activation-sized `ppermute` up (and one down for V schedules) and
  the same for gradients; at the end, psums over `axis` of the loss and of the first and last
  parameters' gradients, and over `batch_axes` of every gradient.
  """
  if mesh.shape[axis] != schedule.stages:
    raise ValueError(f"run_pipeline: the schedule has {schedule.stages} stages, mesh axis {axis!r} {mesh.shape[axis]}")
  buffers = plan_buffers(schedule, vocab_parallel=vocab is not None)
  p = schedule.stages
  if vocab is not None and vocab.size % p:
    raise ValueError(f"run_pipeline: vocabulary size {vocab.size} is not divisible by the {p} stages")
  table = {"kind": schedule.kind, "mb": schedule.microbatch, "chunk": schedule.chunk,
           **{f.name: getattr(buffers, f.name) for f in buffers.__dataclass_fields__.values()
              if isinstance(getattr(buffers, f.name), np.ndarray) and f.name != "held"}}
  # One `switch` per tick: each branch is an action with its part's role (first, last) fixed,
  # so no branch asks again (every conditional costs GPUs a wait for the host).
  roles = _roles(schedule.kind, buffers, split=vocab is not None)
  branch_of = sorted(set(map(tuple, roles.reshape(-1, 3).tolist())))
  table["branch"] = np.vectorize(lambda *r: branch_of.index(r), otypes=[int])(*np.moveaxis(roles, -1, 0))
  table = {k: jnp.asarray(v, jnp.int32) for k, v in table.items()}  # [ticks, stages]
  two_way = schedule.placement == "v"
  batch_axes = tuple(a for a in batch_axes if mesh.shape[a] > 1)
  # Each first/last leaf's vocabulary dimension split over `axis` (None: whole on every stage).
  first_dims = vocab.first_dims if vocab else jax.tree.map(lambda _: None, first_params)
  last_dims = vocab.last_dims if vocab else jax.tree.map(lambda _: None, last_params)
  local = functools.partial(_local, first_fn=first_fn, part_fn=part_fn, last_fn=last_fn, axis=axis, p=p,
                            batch_axes=batch_axes, x_slots=buffers.x_slots, g_slots=buffers.g_slots,
                            two_way=two_way, microbatches=schedule.microbatches, chunks=schedule.chunks, x_spec=x_spec,
                            vocab=vocab, dims=(first_dims, last_dims), branch_of=tuple(branch_of),
                            zero_bubble=schedule.split_backward)
  rep = P()
  part_spec = jax.tree.map(lambda _: P(axis), part_params)
  over_vocab = lambda dims, params: jax.tree.map(lambda d, _: rep if d is None else P(*([None] * d), axis), dims,
                                                 params, is_leaf=_is_none)
  first_spec, last_spec = over_vocab(first_dims, first_params), over_vocab(last_dims, last_params)
  stats_spec = {"peak_held": P(axis), "b_tick": P(axis), "w_tick": P(axis)}
  rows = P(None, batch_axes or None)
  return jax.shard_map(local, mesh=mesh, axis_names=frozenset({axis, *batch_axes}),
                       in_specs=(jax.tree.map(lambda _: P(None, axis), table), first_spec, part_spec, last_spec,
                                 jax.tree.map(lambda _: rows, inputs)),
                       out_specs=(rep, rep, first_spec, part_spec, last_spec, stats_spec),
                       check_vma=False)(table, first_params, part_params, last_params, inputs)


def _local(table, first_params, part_params, last_params, inputs, *, first_fn, part_fn, last_fn, axis, p, batch_axes,
           x_slots, g_slots, two_way, microbatches, chunks, x_spec, vocab, dims, branch_of, zero_bubble):
  part_params = jax.tree.map(lambda x: x[0], part_params)  # this stage's [chunks, ...]
  if vocab is not None:
    first_fn = partial_embedding(first_fn, vocab, axis, p)
  x_shape = jax.eval_shape(first_fn, first_params, jax.tree.map(lambda x: x[0], inputs))  # this shard's rows
  # Without vocabulary parallelism the embedding runs inside the first part's actions and the
  # head inside the last part's backward (its forward only stores the input); with it, both run
  # beside the switch on every stage.
  split = vocab is not None
  zeros_x = jnp.zeros(x_shape.shape, x_shape.dtype)
  xbuf = jnp.zeros((x_slots + 1,) + x_shape.shape, x_shape.dtype)
  gbuf = jnp.zeros((g_slots + 1,) + x_shape.shape, F32)
  # With one microbatch each stage's chunk gets one weight gradient: it is stored as it comes, in
  # its own dtype (no float32 sum to keep, half the bytes to write and for the update to read).
  # (Not so with B and W split: both give part of it.)
  single = microbatches == 1 and not zero_bubble
  if zero_bubble:  # B keeps each weight matmul's input and output gradient; W is those matmuls
    struct = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), tree)
    params0, mb0 = struct(part_params), struct(inputs)  # one chunk's weights, one microbatch
    bw = split_backward(part_fn, params0, x_shape, mb0)
    saved = jax.eval_shape(lambda w, x, mb: bw.b(w, x, mb)[1](x)[2], params0, x_shape, mb0)
  acc = {"first": jax.tree.map(lambda x: jnp.zeros(x.shape, F32), first_params),
         "part": jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype if single else F32), part_params),
         "last": jax.tree.map(lambda x: jnp.zeros(x.shape, F32), last_params),
         "loss": jnp.zeros((), F32), "count": jnp.zeros((), F32),
         # What ran, counted at run time (tests compare it with the simulator).
         "held": jnp.zeros((), jnp.int32), "peak_held": jnp.zeros((), jnp.int32),
         "b_tick": jnp.full((microbatches, chunks), -1, jnp.int32), "w_tick": jnp.full((microbatches, chunks), -1, jnp.int32),
         # Zero-bubble: what B saved for W, from B to W, in the slot of the part's input (B and W
         # always have one: no spare slot).
         "saved": jax.tree.map(lambda s: jnp.zeros((x_slots,) + s.shape, s.dtype), saved) if zero_bubble else {}}
  arrived = {"x_up": zeros_x, "x_down": zeros_x, "g_up": zeros_x.astype(F32), "g_down": zeros_x.astype(F32)}
  take = lambda tree, i: jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), tree)

  def loss_of(x, params, last_p, mb_in):
    return last_fn(last_p, part_fn(params, x, mb_in), mb_in)

  # (`first`, `last`: the action's part is the model's first, its last; always False with the
  # vocabulary split, where the embedding and the head run beside the switch.)
  def forward(state, r, first: bool, last: bool):
    xbuf, gbuf, acc = state
    mb_in, params = take(inputs, r["mb"]), take(part_params, r["chunk"])
    if first:
      x = first_fn(first_params, mb_in).astype(x_shape.dtype)
      xbuf = _put(xbuf, r["x_slot"], x)
    else:  # arrived, or stored by the embedding phase
      x = _get(xbuf, r["x_slot"])
    # The last part's forward only stores its input: its backward runs it with the head.
    y = x if last else part_fn(params, x, mb_in).astype(x_shape.dtype)
    xbuf = _put(xbuf, jnp.where(r["send_x"] == LOCAL, r["local_slot"], -1), y)
    return (xbuf, gbuf, acc), y, jnp.zeros(x_shape.shape, F32)

  def backward(state, r, first: bool, last: bool):
    """The combined backward (schedules without the B/W split): input and weight gradients."""
    xbuf, gbuf, acc = state
    mb_in, params, x = take(inputs, r["mb"]), take(part_params, r["chunk"]), _get(xbuf, r["x_slot"])
    if last:  # from the loss, through the head
      (loss, count), g = _vjp(lambda x, w, last: loss_of(x, w, last, mb_in),
                              {"x": x, "w": params, "last": last_params}, (jnp.ones((), F32), jnp.zeros((), F32)))
      acc = counted(acc, loss, count, g["last"])
    else:  # from the output gradient that arrived
      _, g = _vjp(lambda x, w: part_fn(w, x, mb_in), {"x": x, "w": params}, _get(gbuf, r["g_slot"]).astype(x.dtype))
    acc = {**acc, "part": (_set_at if single else _add_at)(acc["part"], r["chunk"], g["w"])}
    return sent_back((xbuf, gbuf, acc), r, first, mb_in, g["x"])

  def counted(acc, loss, count, d_last):
    """The loss (and the head's gradient), counted once, with the last part's input gradient."""
    return {**acc, "last": jax.tree.map(lambda a, g: a + g.astype(F32), acc["last"], d_last),
            "loss": acc["loss"] + loss.astype(F32), "count": acc["count"] + count.astype(F32)}

  def sent_back(state, r, first: bool, mb_in, dx):
    """After an input gradient: the embedding's gradient on the first part (with the vocabulary
    split the embedding phase takes it, on every stage), and the gradient kept or sent on."""
    xbuf, gbuf, acc = state
    if first:
      _, vjp = jax.vjp(lambda fp: first_fn(fp, mb_in), first_params)
      (d,) = vjp(dx.astype(x_shape.dtype))
      acc = {**acc, "first": jax.tree.map(lambda a, b: a + b.astype(F32), acc["first"], d)}
    gbuf = _put(gbuf, jnp.where(r["send_g"] == LOCAL, r["local_slot"], -1), dx)
    return (xbuf, gbuf, acc), jnp.zeros(x_shape.shape, x_shape.dtype), dx

  def backward_inputs(state, r, first: bool, last: bool):
    """Zero-bubble B: the input gradient, the gradient of the weights not used by matmuls, and
    for W each weight matmul's input and output gradient (`split_backward.py`)."""
    xbuf, gbuf, acc = state
    mb_in, params, x = take(inputs, r["mb"]), take(part_params, r["chunk"]), _get(xbuf, r["x_slot"])
    y, pullback = bw.b(params, x, mb_in)
    if last:  # through the head first
      (loss, count), head = jax.vjp(lambda y, lp: last_fn(lp, y, mb_in), y, last_params)
      dy, d_last = head((jnp.ones((), F32), jnp.zeros((), F32)))
    else:
      dy = _get(gbuf, r["g_slot"]).astype(y.dtype)
    dx, dw, saved = pullback(dy)
    acc = {**acc, "part": _add_at(acc["part"], r["chunk"], dw),
           "saved": jax.tree.map(lambda buf, v: jax.lax.dynamic_update_index_in_dim(buf, v, r["x_slot"], 0),
                                 acc["saved"], saved)}
    if last:
      acc = counted(acc, loss, count, d_last)
    return sent_back((xbuf, gbuf, acc), r, first, mb_in, dx.astype(F32))

  def backward_weights(state, r, first, last):
    """Zero-bubble W: the weight matmuls' gradients from what B saved."""
    del first, last
    xbuf, gbuf, acc = state
    saved = jax.tree.map(lambda buf: _get(buf, r["x_slot"]), acc["saved"])
    acc = {**acc, "part": _add_at(acc["part"], r["chunk"], bw.w_grad(take(part_params, r["chunk"]), saved))}
    return (xbuf, gbuf, acc), jnp.zeros(x_shape.shape, x_shape.dtype), jnp.zeros(x_shape.shape, F32)

  def idle(state, r, first, last):
    del r, first, last
    return state, jnp.zeros(x_shape.shape, x_shape.dtype), jnp.zeros(x_shape.shape, F32)

  actions = {IDLE: idle, F: forward, B: backward_inputs, W: backward_weights, BW: backward}
  branches = [functools.partial(actions[kind], first=bool(first), last=bool(last)) for kind, first, last in branch_of]

  pin = (lambda v, *lead: v) if x_spec is None else (
      lambda v, *lead: jax.lax.with_sharding_constraint(v, P(*lead, *x_spec)))

  def pinned(branch):
    def run(state, r):
      (xbuf, gbuf, acc), y, dx = branch(state, r)
      return (pin(xbuf, None), pin(gbuf, None), acc), pin(y), pin(dx)
    return run

  branches = [pinned(b) for b in branches]

  def embed_phase(xbuf, r):
    """Every stage looks up its slice; the sum lands on the stage running the first part."""
    x = jax.lax.psum(first_fn(first_params, take(inputs, r["embed_mb"])).astype(x_shape.dtype), axis)
    return pin(_put(xbuf, jnp.where((r["kind"] == F) & (r["first"] == 1), r["x_slot"], -1), x), None)

  def head_phase(gbuf, acc, r, y):
    """The last part's output, summed to every stage; each scores its slice of the vocabulary."""
    here = (r["kind"] == F) & (r["last"] == 1)
    h = jax.lax.psum(jnp.where(here, y, jnp.zeros_like(y)), axis)
    loss, count, d_last, d_h = head_loss_and_grads(last_fn, vocab, axis, last_params, h, take(inputs, r["head_mb"]))
    acc = {**acc, "last": jax.tree.map(jnp.add, acc["last"], d_last), "loss": acc["loss"] + jnp.where(here, loss, 0.0),
           "count": acc["count"] + jnp.where(here, count, 0.0)}
    return pin(_put(gbuf, jnp.where(here, r["head_slot"], -1), d_h), None), acc

  def embed_grad_phase(acc, r, dx):
    """The first part's input gradient, summed to every stage; each takes its slice's gradient."""
    here = ((r["kind"] == B) | (r["kind"] == BW)) & (r["first"] == 1)
    d = jax.lax.psum(jnp.where(here, dx, jnp.zeros_like(dx)), axis)
    _, pullback = jax.vjp(lambda fp: first_fn(fp, take(inputs, r["embed_grad_mb"])), first_params)
    (g,) = pullback(d.astype(x_shape.dtype))
    return {**acc, "first": jax.tree.map(lambda a, b: a + b.astype(F32), acc["first"], g)}

  def tick(carry, row):
    xbuf, gbuf, acc, arrived = carry
    t, r = row[0], jax.tree.map(lambda a: a[0], row[1])
    xbuf = _put(_put(xbuf, r["arrive_x_up"], arrived["x_up"]), r["arrive_x_down"], arrived["x_down"])
    gbuf = _put(_put(gbuf, r["arrive_g_up"], arrived["g_up"]), r["arrive_g_down"], arrived["g_down"])
    stored = ((r["arrive_x_up"] >= 0).astype(jnp.int32) + (r["arrive_x_down"] >= 0)
              + ((r["kind"] == F) & (r["first"] == 1)) + ((r["kind"] == F) & (r["send_x"] == LOCAL)))
    if split:
      xbuf = jax.lax.cond(r["embed_mb"] >= 0, embed_phase, lambda b, r: b, xbuf, r)
    (xbuf, gbuf, acc), y, dx = jax.lax.switch(r["branch"], branches, (xbuf, gbuf, acc), r)
    if split:
      gbuf, acc = jax.lax.cond(r["head_mb"] >= 0, head_phase, lambda gbuf, acc, r, y: (gbuf, acc), gbuf, acc, r, y)
      acc = jax.lax.cond(r["embed_grad_mb"] >= 0, embed_grad_phase, lambda acc, r, dx: acc, acc, r, dx)
    acc = _count(acc, r, t, stored)
    pick = lambda v, sel, direction: jnp.where(sel == direction, v, jnp.zeros_like(v))
    arrived = {"x_up": jax.lax.ppermute(pick(y, r["send_x"], UP), axis, _shift(p, 1)),
               "g_down": jax.lax.ppermute(pick(dx, r["send_g"], DOWN), axis, _shift(p, -1))}
    if two_way:
      arrived["x_down"] = jax.lax.ppermute(pick(y, r["send_x"], DOWN), axis, _shift(p, -1))
      arrived["g_up"] = jax.lax.ppermute(pick(dx, r["send_g"], UP), axis, _shift(p, 1))
    else:
      arrived["x_down"], arrived["g_up"] = jnp.zeros_like(y), jnp.zeros_like(dx)
    return (xbuf, gbuf, acc, arrived), None

  ticks = jnp.arange(table["kind"].shape[0], dtype=jnp.int32)
  (_, _, acc, _), _ = jax.lax.scan(tick, (xbuf, gbuf, acc, arrived), (ticks, table))  # rows [1]: this stage's
  # The one reduction of the step: over stages for what every stage shares (not the vocabulary
  # slices of a split embedding and head), over batch shards for all.
  psum = lambda t, axes=(axis, *batch_axes): jax.tree.map(lambda a: jax.lax.psum(a, axes) if axes else a, t)
  shared = lambda tree, dims: jax.tree.map(lambda d, a: psum(a, (axis, *batch_axes) if d is None else batch_axes),
                                          dims, tree, is_leaf=_is_none)
  part_grads = jax.tree.map(lambda a: a[None], psum(acc["part"], batch_axes))
  stats = {k: acc[k][None] for k in ("peak_held", "b_tick", "w_tick")}
  return (psum(acc["loss"]), psum(acc["count"]), shared(acc["first"], dims[0]), part_grads,
          shared(acc["last"], dims[1]), stats)


def _roles(kind: np.ndarray, buffers, split: bool) -> np.ndarray:
  """[ticks, stages, 3]: (kind, first, last) of each action, with the roles that change nothing
  for it cleared: none for idle ticks or under the vocabulary split; W never runs the embedding."""
  first = np.where((kind == IDLE) | (kind == W) | split, 0, buffers.first)
  last = np.where((kind == IDLE) | split, 0, buffers.last)
  return np.stack([kind, first, last], axis=-1).astype(int)


def _is_none(x) -> bool:
  return x is None


def _count(acc: dict, r: dict, t: jax.Array, stored: jax.Array) -> dict:
  """Inputs held (stored this tick, freed by W or a combined backward) and when B and W ran."""
  held = acc["held"] + stored
  peak = jnp.maximum(acc["peak_held"], held)
  held = held - ((r["kind"] == W) | (r["kind"] == BW)).astype(jnp.int32)
  at = (r["mb"], r["chunk"])
  b_tick = jnp.where((r["kind"] == B) | (r["kind"] == BW), acc["b_tick"].at[at].set(t), acc["b_tick"])
  w_tick = jnp.where((r["kind"] == W) | (r["kind"] == BW), acc["w_tick"].at[at].set(t), acc["w_tick"])
  return {**acc, "held": held, "peak_held": peak, "b_tick": b_tick, "w_tick": w_tick}
