"""The outer steps of parallel/lowcomm/ as ops on the 8-device CPU mesh (replica=4 x fsdp=2), each
against numpy, a reduction to a known case, and its byte account against the compiled program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import P

from configs.base import LowCommConfig
from parallel.lowcomm import co2, noloco, outer, sparseloco, streaming_diloco
from parallel.lowcomm.diloco import diloco_sync
from parallel.mesh import make_mesh
from tests.training import hlo_collectives

R, ISLAND = 4, 2
SHAPES = {"embed": (6, 4), "layers": {"w": (4, 3, 5), "b": (4, 5)}, "final_norm": {"scale": (4,)}, "lm_head": (4, 6)}


@pytest.fixture(scope="module")
def mesh():
  return make_mesh({"replica": R, "fsdp": ISLAND}, jax.devices())


def tree(seed: int, scale: float = 1.0):
  """A parameter-shaped tree per replica: every leaf [R, ...], float32."""
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree.flatten(SHAPES, is_leaf=lambda x: isinstance(x, tuple))
  return jax.tree.unflatten(treedef, [(scale * rng.standard_normal((R, *s))).astype(np.float32) for s in leaves])


def same_on_all(t):
  return jax.tree.map(lambda x: np.broadcast_to(x[:1], x.shape).copy(), t)


def run(mesh, fn, *trees):
  """fn(*one replica's trees) -> (outputs, bytes) inside a shard_map manual over replica.
  Returns (outputs with a leading [R], bytes, HLO text)."""
  sent = {}

  def local(*ts):
    out, b = fn(*jax.tree.map(lambda x: x[0], ts))
    sent["bytes"] = b
    return jax.tree.map(lambda x: x[None], out)

  f = jax.jit(jax.shard_map(local, mesh=mesh, axis_names=frozenset({"replica"}), in_specs=P("replica"),
                            out_specs=P("replica"), check_vma=False))
  args = jax.device_put(trees, jax.sharding.NamedSharding(mesh, P("replica")))
  out = f(*args)
  hlo = f.lower(*args).compile().as_text()
  return jax.tree.map(np.asarray, out), sent["bytes"], hlo


def check_bytes(mesh, hlo: str, account: int, kinds: set[str]):
  shape = tuple(mesh.devices.shape)
  axis = list(mesh.axis_names).index("replica")
  found = [c for c in hlo_collectives.collectives(hlo) if hlo_collectives.crosses_axis(c["groups"], shape, axis)]
  assert {c["kind"] for c in found} == kinds
  assert all(hlo_collectives.only_along_axis(c["groups"], shape, axis) for c in found)
  assert sum(c["operand_bytes"] for c in found) * ISLAND == account


def close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


def test_nesterov_step_matches_numpy():
  p, d, m = tree(0), tree(1), tree(2)
  new_p, new_m = outer.nesterov_step(p, d, m, lr=0.7, mu=0.9)
  close(new_m, jax.tree.map(lambda m, d: 0.9 * m + d, m, d))
  close(new_p, jax.tree.map(lambda p, d, m: p - 0.7 * (d + 0.9 * (0.9 * m + d)), p, d, m))
  plain_p, _ = outer.nesterov_step(p, d, m, lr=0.7, mu=0.9, nesterov=False)
  close(plain_p, jax.tree.map(lambda p, d, m: p - 0.7 * (0.9 * m + d), p, d, m))


def test_diloco_sync_bytes(mesh):
  g, l, m = same_on_all(tree(0)), tree(1), same_on_all(tree(2))
  fn = lambda g, l, m: (lambda out: ((out[0], out[1]), out[2]))(diloco_sync(g, l, m, axis="replica", lr=0.7, mu=0.9))
  (new, mom), sent, hlo = run(mesh, fn, g, l, m)
  delta = jax.tree.map(lambda g, l: g[0] - l.mean(0), g, l)
  close(jax.tree.map(lambda x: x[0], mom), jax.tree.map(lambda m, d: 0.9 * m[0] + d, m, delta))
  check_bytes(mesh, hlo, sent, {"all-reduce"})


# ---- Streaming DiLoCo ------------------------------------------------------------------------------

def test_fragments_partition_the_parameters():
  t = jax.tree.map(lambda x: jnp.asarray(x[0]), tree(0))
  seen = []
  for p in range(2):
    frag = streaming_diloco.fragment_of(t, p, 2)
    seen += [x.size for x in jax.tree.leaves(frag)]
    zeroed = streaming_diloco.with_fragment(t, jax.tree.map(jnp.zeros_like, frag), p, 2)
    t = zeroed
  assert sum(seen) == sum(x.size for x in jax.tree.leaves(t))
  assert all(not np.any(x) for x in jax.tree.leaves(t))


@pytest.mark.parametrize("bits", [0, 4])
def test_streaming_fragment_sync_and_mix(mesh, bits):
  cfg = LowCommConfig(inner_steps=4, fragments=2, delay=0, mix=0.25, quant_bits=bits, outer_lr=0.7, outer_momentum=0.9)
  algo = streaming_diloco.StreamingDiLoCo(cfg, 4)
  assert algo.events(2) == ((0,), (0,)) and algo.events(4) == ((1,), (1,)) and algo.events(3) == ((), ())
  g, m = same_on_all(tree(0)), same_on_all(tree(2))
  l = jax.tree.map(lambda a, b: a + b, g, tree(1, 0.1))  # outer - local of moderate size

  def fn(g, l, m):
    params, state, sent = algo.before(((0,), (0,)), l, {"params": g, "momentum": m}, axis="replica")
    return (params, state["params"]), sent

  (params, new_outer), sent, hlo = run(mesh, fn, g, l, m)
  frag = lambda t: jax.tree.map(np.asarray, jax.vmap(lambda one: streaming_diloco.fragment_of(one, 0, 2))(t))
  delta = jax.tree.map(lambda a, b: (a - b).mean(0), frag(g), frag(l))
  mom = jax.tree.map(lambda m, d: 0.9 * m[0] + d, frag(m), delta)
  expect_g = jax.tree.map(lambda g, d, m: g[0] - 0.7 * (d + 0.9 * m), frag(g), delta, mom)
  expect_l = jax.tree.map(lambda l, g: 0.25 * l + 0.75 * g, frag(l), expect_g)
  if bits == 0:
    close(jax.tree.map(lambda x: x[0], frag(new_outer)), expect_g)
    close(frag(params), expect_l)
    check_bytes(mesh, hlo, sent, {"all-reduce"})
  else:  # 4-bit codes: each value within half a level (absmax / 15) of the exact mean, times the step
    err = jax.tree.map(lambda a, b: np.abs(a[0] - b).max(), frag(new_outer), expect_g)
    bound = jax.tree.map(lambda a, b: 0.7 * 1.9 * np.abs(a - b).max() / 15 + 1e-6, frag(g), frag(l))
    assert all(e <= b for e, b in zip(jax.tree.leaves(err), jax.tree.leaves(bound)))
    assert max(jax.tree.leaves(err)) > 0  # the quantisation did happen
    check_bytes(mesh, hlo, sent, {"all-gather"})
  other = lambda t: jax.vmap(lambda one: streaming_diloco.fragment_of(one, 1, 2))(t)
  close(other(params), other(l))


# ---- NoLoCo --------------------------------------------------------------------------------------

def test_noloco_round_matches_numpy_and_keeps_the_mean(mesh):
  pairs = noloco.pairing(0, 3, R)
  assert sorted(i for p in pairs for i in p) == list(range(R))
  peer = {a: b for x, y in pairs for a, b in ((x, y), (y, x))}
  phi, local, m = tree(0), tree(1), tree(2)
  lr, mu, gamma = 0.7, 0.9, 0.5

  def fn(phi, local, m, lr=lr):
    new_p, new_m, sent = noloco.noloco_sync(phi, local, m, axis="replica", pairs=pairs, lr=lr, mu=mu, gamma=gamma)
    return (new_p, new_m), sent

  (new_p, new_m), sent, hlo = run(mesh, fn, phi, local, m)
  for r in range(R):
    j = peer[r]
    u = jax.tree.map(lambda f, l: lr * ((f[r] - l[r]) + (f[j] - l[j])) / 2 + gamma * (f[r] - (f[r] + f[j]) / 2),
                     phi, local)
    mm = jax.tree.map(lambda m, u: mu * m[r] + u, m, u)
    close(jax.tree.map(lambda x: x[r], new_m), mm)
    close(jax.tree.map(lambda x: x[r], new_p), jax.tree.map(lambda f, u, mm: f[r] - (u + mu * mm), phi, u, mm))
  check_bytes(mesh, hlo, sent, {"collective-permute"})
  # With no progress to apply (lr = 0) and no momentum, a round only pulls pairs together: the mean stays.
  zero_m = jax.tree.map(np.zeros_like, m)
  (kept, _), _, _ = run(mesh, lambda f, l, m: fn(f, l, m, lr=0.0), phi, local, zero_m)
  close(jax.tree.map(lambda x: x.mean(0), kept), jax.tree.map(lambda x: x.mean(0), phi))
  assert max(jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), kept, phi))) > 0.1


# ---- CO2 -----------------------------------------------------------------------------------------

def test_co2_two_boundaries_match_numpy(mesh):
  lr, mu, clip, lam = 0.7, 0.9, 0.2, 0.5
  start0 = same_on_all(tree(0))
  local1, local2 = tree(1, 0.1), tree(2, 0.1)
  state = {"params": start0, "momentum": jax.tree.map(np.zeros_like, start0), "start": start0,
           "pending": jax.tree.map(np.zeros_like, start0)}

  def fn(state, local):
    new_local, new_state, sent = co2.co2_boundary(state, local, axis="replica", lr=lr, mu=mu, clip=clip, penalty=lam)
    return (new_local, new_state), sent

  local1 = jax.tree.map(lambda s, d: s + d, start0, local1)
  (after1, state1), sent, hlo = run(mesh, fn, state, local1)
  check_bytes(mesh, hlo, sent, {"all-reduce"})
  # Boundary 1: nothing has landed: phi stays, each island keeps (1 - lambda) of its round.
  d1 = jax.tree.map(lambda s, l: s - l, start0, local1)
  close(state1["params"], start0)
  close(after1, jax.tree.map(lambda p, d: p - (1 - lam) * d, start0, d1))
  close(state1["pending"], jax.tree.map(lambda d: np.broadcast_to(d.mean(0), d.shape), d1))
  # Boundary 2: round 1's mean lands (momentum clipped), round 2's is issued.
  local2 = jax.tree.map(lambda s, d: s + d, after1, local2)
  (after2, state2), _, _ = run(mesh, fn, state1, local2)
  landed = jax.tree.map(lambda d: d.mean(0), d1)
  norm = np.sqrt(sum(np.sum(x**2) for x in jax.tree.leaves(landed)))
  mom = jax.tree.map(lambda x: x * min(1.0, clip / norm), landed)
  assert norm > clip  # the clip is exercised
  phi = jax.tree.map(lambda p, d, m: p[0] - lr * (d + mu * m), start0, landed, mom)
  d2 = jax.tree.map(lambda s, l: s - l, after1, local2)
  close(jax.tree.map(lambda x: x[0], state2["params"]), phi)
  close(jax.tree.map(lambda x: x[0], state2["momentum"]), mom)
  close(after2, jax.tree.map(lambda p, d: p[None] - (1 - lam) * d, phi, d2))


# ---- SparseLoCo ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction,bits", [(0.25, 2), (1.0, 0)])
def test_sparseloco_error_feedback_and_outer_step(mesh, fraction, bits):
  g, l, e = same_on_all(tree(0)), tree(1), tree(2, 0.1)
  lr, beta = 0.7, 0.5

  def fn(g, l, e):
    new, err, sent = sparseloco.sparseloco_sync(g, l, e, axis="replica", lr=lr, beta=beta, fraction=fraction, bits=bits)
    return (new, err), sent

  (new, err), sent, hlo = run(mesh, fn, g, l, e)
  acc = jax.tree.map(lambda g, l, e: beta * e + (g - l), g, l, e)
  shipped = jax.tree.map(lambda a, e: a - e, acc, err)  # what each replica sent, from the feedback invariant
  close(new, jax.tree.map(lambda g, s: np.broadcast_to(g[0] - lr * s.mean(0), g.shape), g, shipped))
  check_bytes(mesh, hlo, sent, {"all-gather"})
  if fraction == 1.0:  # no compression: DiLoCo's outer SGD step, nothing left over
    close(err, jax.tree.map(np.zeros_like, e))
  else:  # per island-device row, at most k values sent
    for leaf in jax.tree.leaves(shipped):
      nonzero = np.count_nonzero(leaf.reshape(R, -1), axis=1)
      assert np.all(nonzero <= np.ceil(leaf[0].size / ISLAND * fraction + 1) * ISLAND)
