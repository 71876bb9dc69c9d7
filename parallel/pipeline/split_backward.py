"""The zero-bubble split of a part's backward: B, the input gradient, and W, one matmul per weight.

Zero Bubble (Qi et al.) defers the weight gradient W to fill bubbles, and that only pays if W is
cheap: for a linear layer y = x @ w it is x^T dy, one matmul from two tensors B already had. A
part is several layers, so asking autodiff for "the weights' gradient" later would re-run the
whole backward chain through the part (the inner layers' dy depend on the outer layers'). Here B
keeps, for every matmul with a weight, its activation operand x and the gradient of its output
dy, and W is those matmuls' weight gradients and nothing else.

It works on any part function, by reading its program (a jaxpr), so the model needs no hooks:

- Every value is traced back to what it depends on: the weights `w` (which leaves), the activation
  and other inputs, or neither. A `dot_general` with one operand computed from weights alone and
  the other from activations is *tapped*: in B its output gets a zero "tap" added, whose
  cotangent is the output's gradient dy, and its activation operand is recorded. Taps inside the
  layer `scan` ride along as per-layer inputs and the records come out stacked per layer; inside
  rematerialised blocks they are inputs and outputs of the same `checkpoint`.
- B differentiates the part with respect to its input, the taps, and the weights that are used
  any other way (norm scales, anything inside a custom-VJP call): those are cheap, and are taken
  in B. The tapped weights enter B as constants, so B computes none of their matmuls.
- W evaluates only the weight-side computations (per-layer slices, casts, layout constraints),
  transposes each tapped matmul at (x, dy) for its weight operand, and pulls that back to the
  weight leaves: one matmul per tapped weight use, plus what the slices and casts cost.

`split_backward(fn, w, x, data)` traces `fn(w, x, data) -> y` once at those shapes and returns
`b(w, x, data) -> (y, pullback)` with `pullback(dy) -> (dx, d_w_in_b, saved)`, and
`w_grad(w, saved) -> d_w_tapped`. The two weight gradients add up to the whole one.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

Path = tuple[int, ...]
NONE = (frozenset(), False)  # depends on neither weights nor activations


def _join(*taints):
  """A value's taint: (the weight leaves it is computed from, if from nothing else; whether it
  depends on activations). Once activations are in, which weights also are does not matter."""
  if any(act for _, act in taints):
    return frozenset(), True
  return frozenset().union(*(leaves for leaves, _ in taints)), False


def _weight_only(t) -> bool:
  return bool(t[0]) and not t[1]


def _inner_closed(eqn):
  """The inner program of a call-like equation that is safe to inline (jit, closed calls)."""
  j = eqn.params.get("jaxpr")
  if isinstance(j, jcore.ClosedJaxpr) and eqn.primitive.name in ("jit", "closed_call"):
    return j
  return None


def _scan_parts(eqn, values) -> tuple[list, list, list]:
  """A scan's operands as (consts, carry, xs): counted by `num_consts`/`num_carry` in older JAX,
  by the `ft_in` tree in newer."""
  prm = eqn.params
  if "num_consts" in prm:
    nc, ncarry = prm["num_consts"], prm["num_carry"]
    return list(values[:nc]), list(values[nc:nc + ncarry]), list(values[nc + ncarry:])
  groups = prm["ft_in"].update(list(range(len(values)))).unpack()
  return tuple([values[i] for i in group] for group in groups)


def _body(eqn):
  """A scan's body as (open jaxpr, consts)."""
  body = eqn.params["jaxpr"]
  return (body.jaxpr, body.consts) if isinstance(body, jcore.ClosedJaxpr) else (body, ())


def _is_remat(eqn) -> bool:
  return isinstance(eqn.params.get("jaxpr"), jcore.Jaxpr) and "policy" in eqn.params and "prevent_cse" in eqn.params


@dataclasses.dataclass
class _Analysis:
  """What the taint pass found: the matmuls W may take (path -> (activation operand index, weight
  operand index, weight leaves)) and the leaves used any other way (taken in B)."""

  taint: dict = dataclasses.field(default_factory=dict)  # (path of the enclosing program, var) -> taint
  candidates: dict = dataclasses.field(default_factory=dict)  # path -> (act_operand, weight_operand, leaves)
  operand: dict = dataclasses.field(default_factory=dict)  # path -> (its program, activation operand var)
  direct_at: dict = dataclasses.field(default_factory=dict)  # path -> leaves used there other than by a matmul

  @property
  def direct(self) -> set:
    return set().union(*self.direct_at.values())

  def read(self, where: Path, v):
    if isinstance(v, jcore.Literal):
      return NONE
    return self.taint.get((where, v), NONE)

  def run(self, jaxpr, where: Path, in_taints) -> list:
    for v, t in zip(jaxpr.invars, in_taints):
      self.taint[(where, v)] = t
    for v in getattr(jaxpr, "constvars", ()):
      self.taint[(where, v)] = NONE
    for i, eqn in enumerate(jaxpr.eqns):
      path = where + (i,)
      ins = [self.read(where, v) for v in eqn.invars]
      outs = self.eqn(eqn, path, ins)
      for v, t in zip(eqn.outvars, outs):
        self.taint[(where, v)] = t
    return [self.read(where, v) for v in jaxpr.outvars]

  def eqn(self, eqn, path: Path, ins) -> list:
    name = eqn.primitive.name
    if name == "scan":
      (body, _), (consts, carry, xs) = _body(eqn), _scan_parts(eqn, ins)
      while True:  # the carry's taint: what it starts with, joined with what the body makes of it
        for table in (self.candidates, self.operand, self.direct_at):  # found with a weaker carry
          for stale in [k for k in table if k[:len(path)] == path]:
            del table[stale]
        outs = self.run(body, path, consts + carry + xs)
        new = [_join(a, b) for a, b in zip(carry, outs[:len(carry)])]
        if new == carry:
          break
        carry = new
      # A carry that starts as weights and meets activations in the loop is a use W cannot take.
      initial = _scan_parts(eqn, ins)[1]
      self.direct_at[path] = frozenset(i for t0, t in zip(initial, carry) if _weight_only(t0) and t[1] for i in t0[0])
      return outs
    inner = _inner_closed(eqn)
    if inner is not None:
      return self.run(inner.jaxpr, path, ins)
    if _is_remat(eqn):
      return self.run(eqn.params["jaxpr"], path, ins)
    joined = _join(*ins)
    mixes = joined[1] and any(_weight_only(t) for t in ins)
    if mixes:
      if name == "dot_general" and len(ins) == 2 and any(t[1] for t in ins):
        w_op = 0 if _weight_only(ins[0]) else 1
        self.candidates[path] = (1 - w_op, w_op, ins[w_op][0])
        self.operand[path] = (path[:-1], eqn.invars[1 - w_op])
      else:  # any other use of a weight with activations: its gradient is taken in B
        self.direct_at[path] = frozenset(i for t in ins if _weight_only(t) for i in t[0])
    return [joined] * len(eqn.outvars)


@jax.custom_vjp
def _tap(out, tap):
  """`out`, with `tap`'s cotangent made the output's gradient (no addition in the forward)."""
  del tap
  return out


def _tap_fwd(out, tap):
  del tap
  return out, None


def _tap_bwd(_, g):
  return g, g


_tap.defvjp(_tap_fwd, _tap_bwd)


def _bind(eqn, invals):
  """Runs one equation as `jax.core.eval_jaxpr` does (its bind parameters: a dict in newer JAX,
  (sub-functions, dict) in older)."""
  got = eqn.primitive.get_bind_params(eqn.params)
  subfuns, params = got if isinstance(got, tuple) else ((), got)
  ctx = getattr(eqn, "ctx", None)
  with ctx.manager if ctx is not None else contextlib.nullcontext():
    out = eqn.primitive.bind(*subfuns, *invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def _under(tree: dict, path: Path) -> dict:
  return {k: v for k, v in tree.items() if k[:len(path)] == path}


class _Interpreter:
  """Evaluates the part's program in one of two modes.

  "b": everything, with taps on the tapped matmuls' outputs and their activation operands
  recorded. "w": only what depends on weights alone (activations are never computed), recording
  each tapped matmul's weight operand.
  """

  def __init__(self, analysis: _Analysis, tapped: dict, records: dict, mode: str):
    self.a, self.tapped, self.records, self.mode = analysis, tapped, records, mode
    self.has_taps = {p[:k] for p in tapped for k in range(len(p) + 1)}

  def run(self, jaxpr, consts, args, where: Path, taps: dict) -> tuple[list, dict]:
    env, recs = {}, {}
    read = lambda v: v.val if isinstance(v, jcore.Literal) else env.get(v)
    for v, x in zip(getattr(jaxpr, "constvars", ()), consts):
      env[v] = x
    for v, x in zip(jaxpr.invars, args):
      env[v] = x
    for i, eqn in enumerate(jaxpr.eqns):
      path = where + (i,)
      if (self.mode == "w" and path not in self.has_taps
          and any(self.a.read(where, v)[1] for v in eqn.outvars)):
        continue  # depends on activations: W never computes it
      outs, sub = self.eqn(eqn, path, [read(v) for v in eqn.invars], taps)
      recs.update(sub)
      for v, x in zip(eqn.outvars, outs):
        env[v] = x
    return [read(v) for v in jaxpr.outvars], recs

  def eqn(self, eqn, path: Path, ins, taps) -> tuple[list, dict]:
    if path in self.tapped:
      act, w_op, _ = self.tapped[path]
      if self.mode == "w":
        return [None], {path: ins[w_op]}
      (out,) = _bind(eqn, ins)
      record = {path: ins[act]} if self.records[path] == path else {}  # one record per shared input
      return [_tap(out, taps[path])], record
    if path not in self.has_taps:
      return _bind(eqn, ins), {}
    if eqn.primitive.name == "scan":
      return self.scan(eqn, path, ins, taps)
    inner = _inner_closed(eqn)
    if inner is not None:
      return self.run(inner.jaxpr, inner.consts, ins, path, taps)
    # a rematerialised block: taps in and records out of the same checkpoint
    jaxpr = eqn.params["jaxpr"]
    fn = lambda ins, sub_taps: self.run(jaxpr, (), ins, path, sub_taps)
    if self.mode == "b":
      fn = jax.checkpoint(fn, policy=eqn.params["policy"], prevent_cse=eqn.params["prevent_cse"])
    return fn(ins, _under(taps, path))

  def scan(self, eqn, path: Path, ins, taps) -> tuple[list, dict]:
    """Taps go in as per-iteration inputs, records come out stacked. In "w" mode the carries
    that hold activations are None (an empty pytree) throughout."""
    prm, (body, body_consts) = eqn.params, _body(eqn)
    consts, carry, xs = _scan_parts(eqn, ins)
    if self.mode == "w":  # a carry that meets activations in the loop is not computed at all
      carry = [None if self.a.read(path, v)[1] else c for c, v in zip(carry, _scan_parts(eqn, body.invars)[1])]

    def step(c, x):
      xs_now, sub_taps = x
      outs, recs = self.run(body, body_consts, [*consts, *c, *xs_now], path, sub_taps)
      return outs[:len(carry)], (outs[len(carry):], recs)

    c, (ys, recs) = jax.lax.scan(step, carry, (xs, _under(taps, path)), length=prm["length"],
                                 reverse=prm["reverse"], unroll=prm["unroll"])
    return [*c, *ys], recs


@dataclasses.dataclass(frozen=True)
class SplitBackward:
  b: Callable  # (w, x, data) -> (y, pullback); pullback(dy) -> (dx, d_w_in_b, saved)
  w_grad: Callable  # (w, saved) -> d_w_tapped
  tapped: int  # matmul equations whose weight gradient W takes (one per use in a scan body)


def split_backward(fn: Callable, w: Any, x: Any, data: Any) -> SplitBackward:
  """Splits the backward of `fn(w, x, data) -> y` (see the module docstring). `w`, `x`, `data`:
  arrays or shape structs fixing the shapes it is traced at."""
  w_leaves, w_def = jax.tree.flatten(w)
  n_w, n_rest = len(w_leaves), len(jax.tree.leaves(x)) + len(jax.tree.leaves(data))
  closed = jax.make_jaxpr(lambda w_l, x, data: fn(jax.tree.unflatten(w_def, w_l), x, data))(w_leaves, x, data)
  out_tree = jax.tree.structure(jax.eval_shape(fn, w, x, data))
  analysis = _Analysis()
  out_taints = analysis.run(closed.jaxpr, (), [(frozenset({i}), False) for i in range(n_w)]
                            + [(frozenset(), True)] * n_rest)
  direct = set(analysis.direct) | {i for t in out_taints if _weight_only(t) for i in t[0]}
  while True:  # a matmul whose weights are also taken in B is left to B as a whole
    grown = direct | {i for _, _, leaves in analysis.candidates.values() if leaves & direct for i in leaves}
    if grown == direct:
      break
    direct = grown
  tapped = {p: c for p, c in analysis.candidates.items() if not c[2] & direct}
  direct_idx = sorted(direct)
  tapped_idx = sorted({i for _, _, leaves in tapped.values() for i in leaves})
  # Matmuls that share an activation operand (q, k and v; gate and up) record it once.
  first_use, records = {}, {}
  for p in sorted(tapped):
    records[p] = first_use.setdefault(analysis.operand[p], p)
  modes = {m: _Interpreter(analysis, tapped, records, m) for m in ("b", "w")}
  sites = {p: _locate(closed.jaxpr, p) for p in tapped}  # (equation, lengths of the enclosing scans)

  def run(mode, w_l, x, data, taps):
    outs, recs = modes[mode].run(closed.jaxpr, closed.consts, [*w_l, *jax.tree.leaves(x), *jax.tree.leaves(data)],
                                 (), taps)
    return jax.tree.unflatten(out_tree, outs), recs

  def with_leaves(w_l, idx, vals):
    w_now = list(w_l)
    for i, v in zip(idx, vals):
      w_now[i] = v
    return w_now

  def b(w_tree, x, data):
    w_l = jax.tree.leaves(w_tree)
    # Zeros shaped like each tapped output, stacked over its enclosing scans.
    taps = {p: jnp.zeros((*lengths, *eqn.outvars[0].aval.shape), eqn.outvars[0].aval.dtype)
            for p, (eqn, lengths) in sites.items()}
    y, vjp, recs = jax.vjp(lambda x, taps, vals: run("b", with_leaves(w_l, direct_idx, vals), x, data, taps),
                           x, taps, [w_l[i] for i in direct_idx], has_aux=True)

    def pullback(dy):
      dx, dtaps, d_direct = vjp(dy)
      dw = with_leaves([jnp.zeros_like(a) for a in w_l], direct_idx, d_direct)
      return dx, jax.tree.unflatten(w_def, dw), (recs, dtaps)

    return y, pullback

  def w_grad(w_tree, saved):
    recs, dtaps = saved
    w_l = jax.tree.leaves(w_tree)
    none = jax.tree.map(lambda _: None, (x, data))
    sides, pull = jax.vjp(lambda vals: run("w", with_leaves(w_l, tapped_idx, vals), *none, {})[1],
                          [w_l[i] for i in tapped_idx])
    d_sides = {p: _transpose_stacked(eqn, tapped[p], recs[records[p]], dtaps[p], sides[p], len(lengths))
               for p, (eqn, lengths) in sites.items()}
    (grads,) = pull(d_sides)
    return jax.tree.unflatten(w_def, with_leaves([jnp.zeros_like(a) for a in w_l], tapped_idx, grads))

  return SplitBackward(b=b, w_grad=w_grad, tapped=len(tapped))


def _locate(jaxpr, path: Path) -> tuple[Any, tuple[int, ...]]:
  """The equation at `path`, and the lengths of the scans around it, outermost first."""
  lengths = []
  for i in path[:-1]:
    eqn = jaxpr.eqns[i]
    if eqn.primitive.name == "scan":
      lengths.append(eqn.params["length"])
    inner = eqn.params["jaxpr"]
    jaxpr = inner.jaxpr if isinstance(inner, jcore.ClosedJaxpr) else inner
  return jaxpr.eqns[path[-1]], tuple(lengths)


def _transpose_stacked(eqn, tap, act, dy, side, depth: int):
  """The tapped matmul's weight-operand cotangent at (activation `act`, output gradient `dy`),
  mapped over the leading axes of `depth` enclosing scans."""
  act_op, w_op, _ = tap

  def one(act, dy, side):
    def apply(ws):
      ins = [None, None]
      ins[act_op], ins[w_op] = act, ws
      return _bind(eqn, ins)[0]
    (d,) = jax.linear_transpose(apply, side)(dy)
    return d

  for _ in range(depth):
    one = jax.vmap(one)
  return one(act, dy, side)
