"""The zero-bubble backward split against plain autodiff: B's input gradient and B's + W's weight
gradients equal `jax.vjp` of the whole part, and W's program holds one matmul per tapped weight
use and nothing of the activations' backward."""

import jax
import jax.numpy as jnp
import pytest

from parallel.pipeline.split_backward import split_backward
from tests.reference import assert_close

D, H, T = 8, 12, 6


def layer(x, wl, dtype):
  """A pre-norm MLP block: a norm scale (used elementwise: taken in B) and two matmuls (W)."""
  h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * wl["scale"]
  up = jnp.einsum("td,dh->th", h.astype(dtype), wl["up"].astype(dtype))
  return x + jnp.einsum("th,hd->td", jax.nn.silu(up), wl["down"].astype(dtype)).astype(x.dtype)


def part(remat, dtype=jnp.float32):
  def fn(w, x, data):
    step = lambda x, wl: (layer(x, wl, dtype), None)
    if remat:
      step = jax.checkpoint(step)
    y = jax.lax.scan(step, x, w["layers"])[0]
    return jnp.tanh(y @ w["out"]) * data["mask"][:, None]
  return fn


def params(n_layers=3, seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  w = {"layers": {"scale": 1.0 + 0.1 * jax.random.normal(ks[0], (n_layers, D)),
                  "up": 0.4 * jax.random.normal(ks[1], (n_layers, D, H)),
                  "down": 0.4 * jax.random.normal(ks[2], (n_layers, H, D))},
       "out": 0.4 * jax.random.normal(ks[3], (D, D))}
  x = jax.random.normal(ks[4], (T, D))
  data = {"mask": (jnp.arange(T) % 4 != 3).astype(jnp.float32)}
  dy = jax.random.normal(ks[5], (T, D))
  return w, x, data, dy


@pytest.mark.parametrize("remat", [False, True])
def test_b_and_w_add_up_to_the_whole_backward(remat):
  fn = part(remat)
  w, x, data, dy = params()
  y_want, vjp = jax.vjp(lambda w, x: fn(w, x, data), w, x)
  dw_want, dx_want = vjp(dy)
  split = split_backward(fn, w, x, data)
  assert split.tapped == 3  # up, down (inside the scan, once each) and out

  @jax.jit
  def run(w, x, data, dy):
    y, pullback = split.b(w, x, data)
    dx, dw_b, saved = pullback(dy)
    return y, dx, dw_b, split.w_grad(w, saved)

  y, dx, dw_b, dw_w = run(w, x, data, dy)
  assert_close(y, y_want, what="output")
  assert_close(dx, dx_want, what="input gradient (B)")
  assert_close(jax.tree.map(jnp.add, dw_b, dw_w), dw_want, what="weight gradients (B + W)")
  # The split is real: B takes the norm scales only, W the matmul weights only.
  assert float(jnp.abs(dw_b["layers"]["up"]).max()) == 0.0 and float(jnp.abs(dw_b["out"]).max()) == 0.0
  assert float(jnp.abs(dw_w["layers"]["scale"]).max()) == 0.0


def test_w_is_one_matmul_per_tapped_weight_and_b_has_none_of_them():
  """Count dot_generals: the whole backward has fwd + 2 per matmul; B (from its input) skips the
  weights' matmuls; W has exactly one per tapped matmul."""
  fn = part(remat=False, dtype=jnp.bfloat16)
  w, x, data, dy = params()
  split = split_backward(fn, w, x, data)

  def dots(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
      n += eqn.primitive.name == "dot_general"
      n += sum(dots(sub) for sub in _subs(eqn))
    return n

  def b_only(w, x, data, dy):
    _, pullback = split.b(w, x, data)
    return pullback(dy)

  saved = jax.eval_shape(b_only, w, x, data, dy)[2]
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), saved)
  w_dots = dots(jax.make_jaxpr(split.w_grad)(w, zeros).jaxpr)
  b_dots = dots(jax.make_jaxpr(b_only)(w, x, data, dy).jaxpr)
  whole = dots(jax.make_jaxpr(lambda w, x, dy: jax.vjp(lambda w, x: fn(w, x, data), w, x)[1](dy))(w, x, dy).jaxpr)
  assert w_dots == 3  # up, down (one scan body) and out
  assert b_dots == whole - 3  # B: forward and input gradients only


def _subs(eqn):
  for v in eqn.params.values():
    if hasattr(v, "jaxpr") and hasattr(v, "consts"):
      yield v.jaxpr
    elif hasattr(v, "eqns"):
      yield v


@pytest.mark.parametrize("remat", ["none", "full"])
def test_the_llama_stack_splits_into_b_and_w(remat):
  """The real layer stack (tiny preset, bf16 compute): B + W equal autodiff, and W is the seven
  projection matmuls of a block (q, k, v, o, gate, up, down)."""
  import configs  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from models.stack import scan_layers  # noqa: PLC0415
  from training.grad import make_compute_params  # noqa: PLC0415
  from training.state import init_state, setup_from_config  # noqa: PLC0415

  cfg = configs.get_config("tiny", ["model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2",
                                    "model.d_ff=64", "model.vocab_size=64", "data.seq_len=16", "data.global_batch=2",
                                    f"model.remat={remat}", "model.compute_dtype=float32"])
  setup = setup_from_config(cfg, jax.devices()[:1])
  compute = make_compute_params(setup)(init_state(setup)["params"])
  fn, _ = nnx.merge(setup.graphdef, compute).layer_fn(setup.plan)

  def part(w, x, data):
    return scan_layers(fn, w, {"x": x, "positions": data, "segment_ids": None})[0]["x"]

  ks = jax.random.split(jax.random.key(3), 2)
  x, dy = jax.random.normal(ks[0], (2, 16, 32)), jax.random.normal(ks[1], (2, 16, 32))
  positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
  w = compute["layers"]
  _, vjp = jax.vjp(lambda w, x: part(w, x, positions), w, x)
  dw_want, dx_want = vjp(dy)
  split = split_backward(part, w, x, positions)
  assert split.tapped == 7

  @jax.jit
  def run(w, x, positions, dy):
    _, pullback = split.b(w, x, positions)
    dx, dw_b, saved = pullback(dy)
    return dx, dw_b, split.w_grad(w, saved)

  dx, dw_b, dw_w = run(w, x, positions, dy)
  assert_close(dx, dx_want, what="input gradient (B)")
  assert_close(jax.tree.map(jnp.add, dw_b, dw_w), dw_want, what="weight gradients (B + W)")


def test_a_weight_carried_into_the_activations_is_taken_in_b():
  """A recurrence whose state starts as a weight: that weight's gradient is B's; the matmul of the
  state (weight-only in the first iteration, an activation after) is still W's."""
  def fn(w, x, data):
    del data
    step = lambda c, x_t: (jnp.tanh(c @ w["a"] + x_t @ w["b"]), None)
    return jax.lax.scan(step, jnp.broadcast_to(w["h0"], (2, D)), x)[0]

  ks = jax.random.split(jax.random.key(4), 5)
  w = {"h0": jax.random.normal(ks[0], (D,)), "a": 0.4 * jax.random.normal(ks[1], (D, D)),
       "b": 0.4 * jax.random.normal(ks[2], (D, D))}
  x, dy = jax.random.normal(ks[3], (T, 2, D)), jax.random.normal(ks[4], (2, D))
  dw_want, dx_want = jax.vjp(lambda w, x: fn(w, x, None), w, x)[1](dy)
  split = split_backward(fn, w, x, None)
  assert split.tapped == 2
  _, pullback = split.b(w, x, None)
  dx, dw_b, saved = pullback(dy)
  dw_w = split.w_grad(w, saved)
  assert_close(dx, dx_want, what="input gradient (B)")
  assert_close(jax.tree.map(jnp.add, dw_b, dw_w), dw_want, what="weight gradients (B + W)")
  assert float(jnp.abs(dw_w["h0"]).max()) == 0.0 and float(jnp.abs(dw_b["a"]).max()) == 0.0
