"""1-bit Adam over a replica axis of 4: the warm-up equals optax's clip + AdamW on the
replica-averaged gradient; the compressed phase equals a numpy re-computation of the algorithm
(worker errors, server errors, averaged signs x scales); it converges on least squares."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from parallel.lowcomm.onebit_adam import OneBitAdam, compressed_allreduce, padded_size
from parallel.mesh import make_mesh
from tests.parallel.per_step_cases import MASK, R, SHAPES, mesh, single, tile, update_fn  # noqa: F401 (mesh: a fixture)
from tests.reference import assert_close
from tests.training import hlo_collectives


def _grads(steps, seed=0):
  """[steps] of {name: [R, *shape]}: each replica's own gradients."""
  keys = jax.random.split(jax.random.key(seed), steps * len(SHAPES)).reshape(steps, len(SHAPES))
  return [{k: 2.0 * jax.random.normal(keys[t, i], (R, *s)) for i, (k, s) in enumerate(sorted(SHAPES.items()))}
          for t in range(steps)]


def _params():
  return {k: jax.random.normal(jax.random.key(9 + i), s) for i, (k, s) in enumerate(sorted(SHAPES.items()))}


def test_warmup_equals_optax_adamw_on_averaged_gradients(mesh):
  opt = OneBitAdam(freeze_step=100, replicas=R, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.5, decay_mask=MASK)
  step_fn = update_fn(opt, mesh)
  tx = optax.chain(optax.clip_by_global_norm(1.5),
                   optax.adamw(lambda c: 0.01 * (c + 1), b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=MASK))
  params, ref = tile(_params()), _params()
  state, ref_state = tile(opt.init(_params())), tx.init(ref)
  ref_step = jax.jit(lambda g, s, p: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
  for t, g in enumerate(_grads(3)):
    (params, state), sent = step_fn(g, state, params, t, 0.01 * (t + 1))
    ref, ref_state = ref_step(jax.tree.map(lambda x: x.mean(0), g), ref_state, ref)
    assert_close(single(params), ref, what=f"params after step {t}")
    assert float(sent) == 4 * (13 + 60)  # one float32 all-reduce of the gradients


def _np_compressed_allreduce(xs, worker_err, server_err, valid=None):
  """xs, worker_err: [R, L]; server_err: [R, chunk]; only the first `valid` values are real. Each
  replica compresses x + e to signs (>= 0 -> +1) times mean|x + e|; the average of those is split
  in R chunks, and server j compresses its chunk + its error the same way (the mean over the
  chunk's real values)."""
  n, size = xs.shape
  valid = size if valid is None else valid
  chunk = padded_size(size, n) // n
  c = xs[:, :valid] + worker_err[:, :valid]
  scales = np.abs(c).mean(axis=1, keepdims=True) if valid else np.zeros((n, 1))
  sent = scales * np.where(c >= 0, 1.0, -1.0)
  avg = sent.mean(axis=0)
  out, new_worker, new_server = np.zeros(size), np.zeros_like(worker_err), np.zeros_like(server_err)
  new_worker[:, :valid] = c - sent
  for j in range(n):
    lo, hi = j * chunk, min((j + 1) * chunk, valid)
    if lo >= hi:
      continue
    cs = avg[lo:hi] + server_err[j, :hi - lo]
    s = np.abs(cs).mean()
    out[lo:hi] = s * np.where(cs >= 0, 1.0, -1.0)
    new_server[j, :hi - lo] = cs - out[lo:hi]
  return out, new_worker, new_server


def test_compressed_allreduce_matches_numpy(mesh):
  size = 13
  chunk = padded_size(size, R) // R

  def body(x, we, se):
    avg, we, se, sent = compressed_allreduce(x[0], we[0], se[0], axis="replica")
    assert sent == 32 // 8 + 4 + chunk // 8 + 4  # Lp = 32
    return avg[None], we[None], se[None]

  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("replica"), out_specs=P("replica"), check_vma=True))
  we, se = jnp.zeros((R, size)), jnp.zeros((R, chunk))
  np_we, np_se = np.zeros((R, size)), np.zeros((R, chunk))
  for t in range(3):
    xs = jax.random.normal(jax.random.key(t), (R, size))
    avg, we, se = f(xs, we, se)
    want, np_we, np_se = _np_compressed_allreduce(np.asarray(xs, np.float64), np_we, np_se)
    for i in range(R):
      assert_close(avg[i], want, what=f"average on replica {i}, round {t}")
    assert_close(we, np_we, what="worker errors")
    assert_close(se, np_se, what="server errors")


def _rows(flat, island):
  """A flat leaf as the island's rows: zero-padded to a multiple of `island`, [island, k]."""
  return np.concatenate([flat, np.zeros(-flat.size % island)]).reshape(island, -1)


def _np_onebit_adam(params, grads_seq, lrs, *, freeze, b1, b2, eps, wd, clip, island=1):
  """Reference written from the paper's description, numpy float64, leaves flattened; with
  island > 1 each of the island's rows of a leaf is compressed and averaged on its own."""
  names = sorted(params)
  p = {k: np.asarray(params[k], np.float64).ravel() for k in names}
  m = {k: np.zeros_like(p[k]) for k in names}
  v = {k: np.zeros_like(p[k]) for k in names}
  k_row = {k: -(-p[k].size // island) for k in names}
  we = {k: np.zeros((island, R, k_row[k])) for k in names}
  se = {k: np.zeros((island, R, padded_size(k_row[k], R) // R)) for k in names}

  def clipped(gs):
    norm = np.sqrt(sum(np.sum(g**2) for g in gs.values()))
    return {k: g if norm < clip else g / norm * clip for k, g in gs.items()}

  for t, (g, lr) in enumerate(zip(grads_seq, lrs), start=1):
    g = {k: np.asarray(g[k], np.float64).reshape(R, -1) for k in names}
    if t <= freeze:
      gm = clipped({k: g[k].mean(0) for k in names})
      for k in names:
        m[k] = b1 * m[k] + (1 - b1) * gm[k]
        v[k] = b2 * v[k] + (1 - b2) * gm[k] ** 2
      vt = t
    else:
      local = [clipped({k: g[k][i] for k in names}) for i in range(R)]
      for k in names:
        rows = np.stack([_rows(b1 * m[k] + (1 - b1) * local[i][k], island) for i in range(R)], axis=1)
        out = []
        for r in range(island):  # [R, k_row] each; the last rows may end in padding
          real = int(np.clip(p[k].size - r * k_row[k], 0, k_row[k]))
          avg, we[k][r], se[k][r] = _np_compressed_allreduce(rows[r], we[k][r], se[k][r], real)
          out.append(avg)
        m[k] = np.concatenate(out)[:p[k].size]
      vt = freeze
    for k in names:
      u = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**vt)) + eps) + (wd * p[k] if MASK[k] else 0.0)
      p[k] = p[k] - lr * u
  return {k: p[k].reshape(SHAPES[k]) for k in names}


def test_compressed_phase_matches_numpy(mesh):
  opt = OneBitAdam(freeze_step=2, replicas=R, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=6.0, decay_mask=MASK)
  step_fn = update_fn(opt, mesh)
  grads, lrs = _grads(5, seed=1), [0.01] * 5
  params, state = tile(_params()), tile(opt.init(_params()))
  sents = []
  for t, g in enumerate(grads):
    (params, state), sent = step_fn(g, state, params, t, lrs[t])
    sents.append(float(sent))
  want = _np_onebit_adam(_params(), grads, lrs, freeze=2, b1=0.9, b2=0.95, eps=1e-8, wd=0.1, clip=6.0)
  assert_close(single(params), want, what="params after 2 warm-up and 3 compressed steps")
  # b: 13 values -> Lp 32; w: 60 -> Lp 64. Per leaf Lp/8 + Lp/(8 R) + 2 scales of 4 bytes.
  assert sents == [4 * 73] * 2 + [(4 + 1 + 8) + (8 + 2 + 8)] * 3
  for leaf in jax.tree.leaves(state.worker_error):
    assert not np.allclose(leaf[0], leaf[1])  # the errors are each replica's own


def test_converges_on_least_squares(mesh):
  """Each replica holds its own rows of one least-squares problem; after the warm-up, 1-bit Adam
  keeps going down to near the optimum of the whole problem."""
  d, rows = 16, 32
  a = jax.random.normal(jax.random.key(0), (R, rows, d))
  x_true = jax.random.normal(jax.random.key(1), (d,))
  b = a @ x_true + 0.1 * jax.random.normal(jax.random.key(2), (R, rows))
  a_all, b_all = np.asarray(a, np.float64).reshape(-1, d), np.asarray(b, np.float64).reshape(-1)
  x_opt = np.linalg.lstsq(a_all, b_all, rcond=None)[0]
  loss = lambda x: 0.5 * np.mean((a_all @ np.asarray(x["x"], np.float64) - b_all) ** 2)

  opt = OneBitAdam(freeze_step=50, replicas=R, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=0.0)
  step_fn = update_fn(opt, mesh)
  grad_fn = jax.jit(jax.vmap(jax.grad(lambda x, ai, bi: 0.5 * jnp.mean((ai @ x["x"] - bi) ** 2)), (None, 0, 0)))
  params = {"x": jnp.zeros((d,))}
  stacked, state = tile(params), tile(opt.init(params))
  initial = loss(params)
  for t in range(400):
    (stacked, state), _ = step_fn(grad_fn(params, a, b), state, stacked, t, 0.1 * (0.99**t))
    params = jax.tree.map(lambda x: x[0], stacked)
  final, best = loss(single(stacked)), loss({"x": x_opt})
  assert final - best < 1e-4 * (initial - best), (initial, final, best)


def test_island_of_two_devices_matches_numpy_and_compiled_bytes():
  """replica=4 x fsdp=2: each island's two devices compress and send their own halves; the result
  equals the numpy re-computation by rows, and the byte account equals the compiled program's
  collectives over `replica` (warm-up psum and compressed exchange both live in the program)."""
  mesh = make_mesh({"replica": R, "fsdp": 2})
  opt = OneBitAdam(freeze_step=1, replicas=R, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=6.0,
                   decay_mask=MASK)
  step_fn = update_fn(opt, mesh)
  grads, lrs = _grads(3, seed=2), [0.01] * 3
  shard = lambda tree: jax.device_put(tree, {"b": jax.NamedSharding(mesh, P("replica")),
                                             "w": jax.NamedSharding(mesh, P("replica", "fsdp"))})
  params, state = shard(tile(_params())), tile(opt.init(_params()))
  sents = []
  for t, g in enumerate(grads):
    (params, state), sent = step_fn(shard(g), state, params, t, lrs[t])
    sents.append(float(sent))
  want = _np_onebit_adam(_params(), grads, lrs, freeze=1, b1=0.9, b2=0.95, eps=1e-8, wd=0.1, clip=6.0, island=2)
  assert_close(single(params), want, what="params, islands of two devices")

  # b: 13 -> rows of 7 -> Lp 32; w: 60 -> rows of 30 -> Lp 32. Per row Lp/8 + Lp/(8 R) + 8.
  compressed = 2 * (4 + 1 + 8) * 2
  assert sents == [4 * (14 + 60), compressed, compressed]
  hlo = step_fn.lower(shard(grads[0]), state, params, 1, 0.01).compile().as_text()
  shape, axis = tuple(mesh.devices.shape), list(mesh.axis_names).index("replica")
  across = [c for c in hlo_collectives.collectives(hlo) if hlo_collectives.crosses_axis(c["groups"], shape, axis)]
  assert all(hlo_collectives.only_along_axis(c["groups"], shape, axis) for c in across)
  assert 2 * sum(c["operand_bytes"] for c in across) == sents[0] + sents[1]  # both branches, per island
