"""The pipeline executor against the plain model on one device: loss and gradients of every
schedule at 2, 4 and 8 stages, microbatches equal to and more than the stages; the activations it
held and when its W ran, counted as it ran, against the simulator and the schedule."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from parallel.mesh import make_mesh
from parallel.pipeline.executor import run_pipeline
from parallel.pipeline.schedule import SCHEDULES, make_schedule
from parallel.pipeline.simulate import simulate
from parallel.pipeline.vocab import VocabSplit
from tests.reference import assert_close

V, D, T, MB = 16, 8, 6, 2  # vocab, width, tokens, rows per microbatch
CHUNKS = {"circular": 2, "interleaved": 2, "zb-v": 2}


def first_fn(fp, mb):
  return jnp.take(fp["embed"], mb["inputs"], axis=0)


def part_fn(w, x, mb):
  del mb
  def layer(x, wl):
    return x + jnp.tanh(x @ wl["a"]) @ wl["b"], None
  return jax.lax.scan(layer, x, w)[0]


def last_fn(lp, x, mb):
  logits = x @ lp["head"]
  ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, mb["targets"][..., None], -1)[..., 0]
  return jnp.sum(ce * mb["mask"]), jnp.sum(mb["mask"])


def model(n_layers, m, seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  fp = {"embed": jax.random.normal(ks[0], (V, D))}
  layers = {"a": 0.5 * jax.random.normal(ks[1], (n_layers, D, D)), "b": 0.5 * jax.random.normal(ks[2], (n_layers, D, D))}
  lp = {"head": jax.random.normal(ks[3], (D, V))}
  inputs = {"inputs": jax.random.randint(ks[4], (m, MB, T), 0, V), "targets": jax.random.randint(ks[5], (m, MB, T), 0, V),
            "mask": (jax.random.uniform(ks[5], (m, MB, T)) > 0.2).astype(jnp.float32)}
  return fp, layers, lp, inputs


def dense_loss(fp, layers, lp, inputs):
  total = count = 0.0
  for i in range(inputs["inputs"].shape[0]):
    mb = jax.tree.map(lambda a: a[i], inputs)
    s, c = last_fn(lp, part_fn(layers, first_fn(fp, mb), mb), mb)
    total, count = total + s, count + c
  return total, count


def to_stages(layers, schedule):
  """[n_layers, ...] -> [stages, chunks, layers per part, ...] in the schedule's placement."""
  per_part = jax.tree.leaves(layers)[0].shape[0] // schedule.n_parts
  order = [[schedule.part(s, c) for c in range(schedule.chunks)] for s in range(schedule.stages)]
  return jax.tree.map(lambda a: a.reshape(schedule.n_parts, per_part, *a.shape[1:])[np.asarray(order)], layers)


def from_stages(grads, schedule):
  parts = [None] * schedule.n_parts
  for s in range(schedule.stages):
    for c in range(schedule.chunks):
      parts[schedule.part(s, c)] = jax.tree.map(lambda a: a[s, c], grads)
  return jax.tree.map(lambda *a: jnp.concatenate(a), *parts)


@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_matches_the_plain_model(name, p):
  mesh = make_mesh({"stage": p}, jax.devices()[:p])
  # Microbatches equal to the stages (p = 2, 8) and more than them (p = 2, 4): every schedule sees both.
  for m in {2: (2, 4), 4: (8,), 8: (8,)}[p]:
    schedule = make_schedule(name, p, m, CHUNKS.get(name, 1))
    fp, layers, lp, inputs = model(2 * schedule.n_parts, m)
    (want_loss, want_count), want = _dense_grads(fp, layers, lp, inputs)
    loss, count, dfp, dparts, dlp, stats = jax.jit(
        lambda *a: run_pipeline(schedule, first_fn, part_fn, last_fn, *a, mesh=mesh))(fp, to_stages(layers, schedule), lp, inputs)
    np.testing.assert_allclose(float(count), float(want_count))
    assert_close(loss, want_loss, what=f"{name} m={m} loss")
    assert_close((dfp, from_stages(dparts, schedule), dlp), want, what=f"{name} m={m} gradients")
    # What the executor held, counted as it ran, is what the simulator predicts.
    assert np.asarray(stats["peak_held"]).tolist() == simulate(schedule)["peak_stored"]
    b, w = np.asarray(stats["b_tick"]), np.asarray(stats["w_tick"])
    assert (b >= 0).all() and (w >= b).all()
    if schedule.split_backward:  # W runs after its B, and some wait longer than a tick
      assert (w > b).all() and (w > b + 1).any()


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_with_data_shards_matches_the_plain_model(name):
  """stage=2 x data=2 x tensor=2, microbatches equal to and more than the stages: each data shard
  pipelines its own rows; one reduction at the end."""
  mesh = make_mesh({"stage": 2, "data": 2, "tensor": 2}, jax.devices()[:8])
  for m in (2, 4):
    schedule = make_schedule(name, 2, m, CHUNKS.get(name, 1))
    fp, layers, lp, inputs = model(2 * schedule.n_parts, m, seed=1)
    (want_loss, want_count), want = _dense_grads(fp, layers, lp, inputs)
    loss, count, dfp, dparts, dlp, _ = jax.jit(lambda *a: run_pipeline(
        schedule, first_fn, part_fn, last_fn, *a, mesh=mesh, batch_axes=("data",)))(fp, to_stages(layers, schedule), lp, inputs)
    np.testing.assert_allclose(float(count), float(want_count))
    assert_close(loss, want_loss, what=f"{name} m={m} loss")
    assert_close((dfp, from_stages(dparts, schedule), dlp), want, what=f"{name} m={m} gradients")


def test_gradients_are_reduced_over_data_once_per_step():
  """No collective over the batch axis inside the tick loop: only after it, once."""
  mesh = make_mesh({"stage": 2, "data": 2}, jax.devices()[:4])
  schedule = make_schedule("1f1b", 2, 4)
  fp, layers, lp, inputs = model(2 * schedule.n_parts, 4)
  jaxpr = jax.make_jaxpr(lambda *a: run_pipeline(schedule, first_fn, part_fn, last_fn, *a, mesh=mesh,
                                                 batch_axes=("data",)))(fp, to_stages(layers, schedule), lp, inputs)
  inside, after, loop_sends = [], [], []

  def walk(jx, in_loop):
    for eqn in jx.eqns:
      axes = eqn.params.get("axes", eqn.params.get("axis_name", ()))
      axes = axes if isinstance(axes, tuple) else (axes,)
      if "data" in axes:
        (inside if in_loop else after).append(eqn.primitive.name)
      if in_loop and eqn.primitive.name == "ppermute":
        loop_sends.append(axes)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub, in_loop or eqn.primitive.name in ("scan", "while"))

  walk(jaxpr.jaxpr, False)
  assert loop_sends, "the walk did not reach the tick loop"
  assert inside == [] and after and set(after) == {"psum"}, (inside, after)


def _dense_grads(fp, layers, lp, inputs):
  (loss, count), grads = jax.value_and_grad(lambda a, b, c: dense_loss(a, b, c, inputs), argnums=(0, 1, 2),
                                            has_aux=True)(fp, layers, lp)
  return (loss, count), grads


def logits_fn(lp, x, mb):
  del mb
  return x @ lp["head"]


@pytest.mark.parametrize("name,p,batch_axes", [("1f1b", 4, ()), ("zb-h1", 2, ("data",)), ("zb-v", 2, ()),
                                               ("gpipe", 8, ())])
def test_vocabulary_parallel_matches_the_last_stage_head(name, p, batch_axes):
  """Embedding and output layer split on the vocabulary over the stages: the same loss and
  gradients as the plain model (whose head is whole, on one device)."""
  d = 2 if batch_axes else 1
  mesh = make_mesh({"stage": p, "data": d}, jax.devices()[:p * d])
  schedule = make_schedule(name, p, 2 * p, CHUNKS.get(name, 1))
  fp, layers, lp, inputs = model(2 * schedule.n_parts, 2 * p, seed=2)
  (want_loss, want_count), want = _dense_grads(fp, layers, lp, inputs)
  split = VocabSplit(size=V, first_dims={"embed": 0}, last_dims={"head": 1}, mask="mask")
  loss, count, dfp, dparts, dlp, _ = jax.jit(lambda *a: run_pipeline(
      schedule, first_fn, part_fn, logits_fn, *a, mesh=mesh, batch_axes=batch_axes, vocab=split))(
          fp, to_stages(layers, schedule), lp, inputs)
  np.testing.assert_allclose(float(count), float(want_count))
  assert_close(loss, want_loss, what=f"{name} loss")
  assert_close((dfp, from_stages(dparts, schedule), dlp), want, what=f"{name} gradients")


@pytest.mark.parametrize("name,p", [("1f1b", 1), ("gpipe", 2)])
def test_one_microbatch_stores_each_weight_gradient_as_it_comes(name, p):
  """m = 1: each chunk gets one weight gradient, stored in the weights' dtype (no float32 sum)."""
  mesh = make_mesh({"stage": p}, jax.devices()[:p])
  schedule = make_schedule(name, p, 1)
  fp, layers, lp, inputs = model(2 * schedule.n_parts, 1, seed=2)
  (want_loss, _), want = _dense_grads(fp, layers, lp, inputs)
  half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), to_stages(layers, schedule))
  loss, _, dfp, dparts, dlp, _ = jax.jit(
      lambda *a: run_pipeline(schedule, first_fn, part_fn, last_fn, *a, mesh=mesh))(fp, to_stages(layers, schedule), lp, inputs)
  assert_close(loss, want_loss, what=f"{name} loss")
  assert_close((dfp, from_stages(dparts, schedule), dlp), want, what=f"{name} gradients")
  _, _, _, dhalf, _, _ = jax.jit(
      lambda *a: run_pipeline(schedule, first_fn, part_fn, last_fn, *a, mesh=mesh))(fp, half, lp, inputs)
  assert jax.tree.leaves(dhalf)[0].dtype == jnp.bfloat16
