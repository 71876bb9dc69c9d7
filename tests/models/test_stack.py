"""The layer-stack seam: the model's three pieces composed by hand (the stack split in two, as a
two-stage pipeline would run it, and a Python loop in place of the scan) give the model's logits,
and per-layer outputs come back stacked on a leading `layers` axis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import ModelConfig
from models.stack import make_layer_fn, scan_layers
from models.transformer import Transformer, logical_axes
from parallel.plan import single_device_plan
from tests.reference import assert_close

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=16)


@pytest.fixture(scope="module")
def model_and_tokens():
  model = Transformer(CFG, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size)
  return model, tokens


def python_loop(layer_fn, stacked, carry, layer_inputs=None, *, unroll=1):
  """A replacement `run_layers`: one layer at a time, per-layer outputs stacked by hand."""
  del unroll
  outputs = []
  for i in range(jax.tree.leaves(stacked)[0].shape[0]):
    carry, out = layer_fn(jax.tree.map(lambda p: p[i], stacked), carry, None)
    outputs.append(out)
  return carry, jax.tree.map(lambda *x: jnp.stack(x), *outputs)


def test_pieces_and_a_split_stack_give_the_models_logits(model_and_tokens):
  model, tokens = model_and_tokens
  plan = single_device_plan()
  want = jax.jit(lambda t: model(t))(tokens)

  @jax.jit
  def two_stages(tokens):
    carry = model.embed_tokens(tokens, plan=plan)  # first stage
    layer_fn, stacked = model.layer_fn(plan)
    first = jax.tree.map(lambda p: p[:2], stacked)
    second = jax.tree.map(lambda p: p[2:], stacked)
    carry, _ = scan_layers(layer_fn, first, carry)
    carry, _ = scan_layers(layer_fn, second, carry)  # second stage
    return model.head(carry["x"], plan=plan)

  assert_close(two_stages(tokens), want, what="logits")
  looped = jax.jit(lambda t: model.head(model.forward_layers(model.embed_tokens(t, plan=plan), plan=plan,
                                                             run_layers=python_loop)[0]["x"], plan=plan))
  assert_close(looped(tokens), want, what="logits")


def test_per_layer_outputs_are_stacked(model_and_tokens):
  """A block that reports a per-layer statistic (as an expert layer reports its router loss)."""
  model, tokens = model_and_tokens
  plan = single_device_plan()
  graphdef, stacked_state = nnx.split(model.layers)
  axes = jax.tree.map(lambda a: a[1:], logical_axes(stacked_state), is_leaf=lambda x: isinstance(x, tuple))
  inner = make_layer_fn(graphdef, axes, plan=plan)

  def layer_fn(params, carry, layer_inputs):
    carry, _ = inner(params, carry, layer_inputs)
    return carry, {"rms": jnp.sqrt(jnp.mean(carry["x"] ** 2)), "index": layer_inputs}

  carry = model.embed_tokens(tokens, plan=plan)
  run = jax.jit(lambda params, carry: scan_layers(layer_fn, params, carry, jnp.arange(CFG.n_layers)))
  final, outputs = run(nnx.to_pure_dict(stacked_state), carry)
  assert outputs["rms"].shape == (CFG.n_layers,)
  np.testing.assert_array_equal(outputs["index"], np.arange(CFG.n_layers))
  np.testing.assert_allclose(outputs["rms"][-1], jnp.sqrt(jnp.mean(final["x"] ** 2)), rtol=1e-6)
