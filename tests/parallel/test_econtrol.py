"""EControl over a replica axis of 4 against a numpy re-computation of Gao et al.'s recursion
(feeding AdamW), its byte count, and convergence on a heterogeneous least-squares problem where
top-k without error control stalls."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from parallel.lowcomm.econtrol import EControl
from parallel.mesh import make_mesh
from tests.parallel.per_step_cases import MASK, R, SHAPES, mesh, single, tile, update_fn  # noqa: F401 (mesh: a fixture)
from tests.reference import assert_close
from tests.training import hlo_collectives


def _np_topk(x, fraction):
  out = np.zeros_like(x)
  keep = np.argsort(-np.abs(x), kind="stable")[:max(1, round(fraction * x.size))]
  out[keep] = x[keep]
  return out


def _np_island_topk(x, fraction, island):
  """Top-k of each of the island's rows of x (zero-padded to a multiple of `island`)."""
  rows = np.concatenate([x, np.zeros(-x.size % island)]).reshape(island, -1)
  return np.concatenate([_np_topk(r, fraction) for r in rows])[:x.size]


def _np_econtrol(params, grads_seq, lrs, *, eta, fraction, freeze, b1, b2, eps, wd, clip, island=1):
  """numpy float64, leaves flattened: EControl's recursion, then clip + AdamW on the estimate."""
  names = sorted(params)
  p = {k: np.asarray(params[k], np.float64).ravel() for k in names}
  m, v, h = ({k: np.zeros_like(p[k]) for k in names} for _ in range(3))
  h_i = {k: np.zeros((R, p[k].size)) for k in names}
  e_i = {k: np.zeros((R, p[k].size)) for k in names}
  for t, (g, lr) in enumerate(zip(grads_seq, lrs), start=1):
    g = {k: np.asarray(g[k], np.float64).reshape(R, -1) for k in names}
    est = {}
    for k in names:
      if t <= freeze:
        est[k] = g[k].mean(0)
        h_i[k], h[k] = g[k].copy(), est[k]
      else:
        deltas = np.stack([_np_island_topk(eta * e_i[k][i] + g[k][i] - h_i[k][i], fraction, island)
                           for i in range(R)])
        est[k] = h[k] + deltas.mean(0)
        e_i[k] = e_i[k] + g[k] - h_i[k] - deltas
        h_i[k] = h_i[k] + deltas
        h[k] = est[k]
    norm = np.sqrt(sum(np.sum(x**2) for x in est.values()))
    for k in names:
      gk = est[k] if norm < clip else est[k] / norm * clip
      m[k] = b1 * m[k] + (1 - b1) * gk
      v[k] = b2 * v[k] + (1 - b2) * gk**2
      u = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps) + (wd * p[k] if MASK[k] else 0.0)
      p[k] = p[k] - lr * u
  return {k: p[k].reshape(SHAPES[k]) for k in names}


def test_econtrol_matches_numpy(mesh):
  kw = dict(eta=0.3, fraction=0.2, freeze_step=1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=8.0)
  opt = EControl(**kw, decay_mask=MASK)
  step_fn = update_fn(opt, mesh)
  keys = jax.random.split(jax.random.key(4), 10)
  grads = [{"b": 2 * jax.random.normal(keys[2 * t], (R, 13)), "w": 2 * jax.random.normal(keys[2 * t + 1], (R, 6, 10))}
           for t in range(5)]
  init = {"b": jax.random.normal(jax.random.key(1), (13,)), "w": jax.random.normal(jax.random.key(2), (6, 10))}
  params, state, sents = tile(init), tile(opt.init(init)), []
  for t, g in enumerate(grads):
    (params, state), sent = step_fn(g, state, params, t, 0.01)
    sents.append(float(sent))
  want = _np_econtrol(init, grads, [0.01] * 5, eta=0.3, fraction=0.2, freeze=1, b1=0.9, b2=0.95, eps=1e-8, wd=0.1,
                      clip=8.0)
  assert_close(single(params), want, what="params after 1 full-precision and 4 compressed steps")
  # top-20%: 3 of 13 and 12 of 60 values, each 4 bytes of value and 4 of index
  assert sents == [4 * 73] + [8 * (3 + 12)] * 4
  assert not np.allclose(state.error["w"][0], state.error["w"][1])


def test_error_control_converges_where_full_error_feedback_does_not(mesh):
  """Least squares split over replicas with different optima (heterogeneous data), top-1 of 16
  values sent per step: with eta = 0.1 EControl reaches the joint optimum; eta = 1 (the error fed
  back at full strength, what EControl exists to temper) does not, on the same problem."""
  d, rows = 16, 24
  a = jax.random.normal(jax.random.key(0), (R, rows, d))
  b = jnp.einsum("rnd,rd->rn", a, jax.random.normal(jax.random.key(1), (R, d)))  # each replica its own optimum
  a_all, b_all = np.asarray(a, np.float64).reshape(-1, d), np.asarray(b, np.float64).reshape(-1)
  best = 0.5 * np.mean((a_all @ np.linalg.lstsq(a_all, b_all, rcond=None)[0] - b_all) ** 2)
  initial = 0.5 * np.mean(b_all**2)
  grad_fn = jax.jit(jax.vmap(jax.grad(lambda x, ai, bi: 0.5 * jnp.mean((ai @ x["x"] - bi) ** 2)), (None, 0, 0)))

  def excess_loss(eta):
    opt = EControl(eta=eta, fraction=1 / 16, freeze_step=0, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=0.0)
    step_fn = update_fn(opt, mesh)
    params = {"x": jnp.zeros((d,))}
    stacked, state = tile(params), tile(opt.init(params))
    for t in range(600):
      (stacked, state), _ = step_fn(grad_fn(params, a, b), state, stacked, t, 0.05 * 0.995**t)
      params = jax.tree.map(lambda x: x[0], stacked)
    final = 0.5 * np.mean((a_all @ np.asarray(single(stacked)["x"], np.float64) - b_all) ** 2)
    return (final - best) / (initial - best)

  assert excess_loss(0.1) < 1e-6
  assert not excess_loss(1.0) < 0.1  # diverges (nan) on this problem


def test_island_of_two_devices_matches_numpy_and_compiled_bytes():
  """replica=4 x fsdp=2: each island device sends the top-k of its own row; the result equals the
  numpy re-computation by rows, and the byte account the compiled program's collectives."""
  mesh = make_mesh({"replica": R, "fsdp": 2})
  opt = EControl(eta=0.3, fraction=0.2, freeze_step=1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=8.0,
                 decay_mask=MASK)
  step_fn = update_fn(opt, mesh)
  keys = jax.random.split(jax.random.key(5), 6)
  grads = [{"b": 2 * jax.random.normal(keys[2 * t], (R, 13)), "w": 2 * jax.random.normal(keys[2 * t + 1], (R, 6, 10))}
           for t in range(3)]
  shard = lambda tree: jax.device_put(tree, {"b": jax.NamedSharding(mesh, P("replica")),
                                             "w": jax.NamedSharding(mesh, P("replica", "fsdp"))})
  init = {"b": jax.random.normal(jax.random.key(1), (13,)), "w": jax.random.normal(jax.random.key(2), (6, 10))}
  params, state, sents = shard(tile(init)), tile(opt.init(init)), []
  for t, g in enumerate(grads):
    (params, state), sent = step_fn(shard(g), state, params, t, 0.01)
    sents.append(float(sent))
  want = _np_econtrol(init, grads, [0.01] * 3, eta=0.3, fraction=0.2, freeze=1, b1=0.9, b2=0.95, eps=1e-8, wd=0.1,
                      clip=8.0, island=2)
  assert_close(single(params), want, what="params, islands of two devices")
  # rows of 7 (b) and 30 (w): top-20% keeps 1 and 6 per row, 8 bytes each, on both devices
  assert sents == [4 * (14 + 60)] + [2 * 8 * (1 + 6)] * 2
  hlo = step_fn.lower(shard(grads[0]), state, params, 1, 0.01).compile().as_text()
  shape, axis = tuple(mesh.devices.shape), list(mesh.axis_names).index("replica")
  across = [c for c in hlo_collectives.collectives(hlo) if hlo_collectives.crosses_axis(c["groups"], shape, axis)]
  assert all(hlo_collectives.only_along_axis(c["groups"], shape, axis) for c in across)
  assert 2 * sum(c["operand_bytes"] for c in across) == sents[0] + sents[1]  # both branches, per island
