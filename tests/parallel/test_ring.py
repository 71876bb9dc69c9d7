"""Ring attention against dense causal attention: every layout, GQA and MQA, packed documents,
6 or 12 tokens per device, float32 and bfloat16, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallel.attention.layout import permutation
from parallel.attention.ring import ring_attention
from parallel.mesh import make_mesh
from tests.parallel.context_cases import check_context_op, inputs
from tests.parallel.test_attention import _reference
from tests.reference import check_against_reference


@pytest.mark.parametrize("mesh", ["seq8", "data2_seq4", "data2_seq2_tensor2"])
@pytest.mark.parametrize("layout", ["zigzag", "striped", "contiguous"])
def test_ring_matches_dense(mesh, layout):
  length = 48 if mesh == "seq8" else 24
  check_context_op(ring_attention, mesh, layout, length=length)


def test_ring_mqa_without_documents():
  check_context_op(ring_attention, "seq8", "zigzag", length=48, heads=4, kv_heads=1, segments=False)


def test_ring_bfloat16():
  check_context_op(ring_attention, "data2_seq4", "zigzag", length=24, dtype=jnp.bfloat16)


@pytest.mark.parametrize("segments", [True, False])
def test_ring_inside_a_layer_scan(segments):
  """As the model runs it: two layers under `lax.scan`, differentiated, with and without segment ids."""
  mesh = make_mesh({"seq": 8})
  q, _, _, seg = inputs(48, 4, 4)
  perm = permutation("zigzag", 48, 8)
  seg_p = seg[:, perm] if segments else None

  def layers(x, attend):
    return jax.lax.scan(lambda x, _: (jnp.tanh(attend(x)), None), x, None, length=2)[0]

  ring = lambda x: ring_attention(x, x, x, seg_p, mesh=mesh, layout="zigzag")
  inverse = np.argsort(perm)  # the layers run on the permuted order; compare on the natural one
  par = lambda x: layers(x[:, perm], ring)[:, inverse]
  ref = lambda x: layers(x, lambda y: _reference(y, y, y, seg if segments else jnp.ones_like(seg)))
  check_against_reference(par, ref, (q,))


def test_ring_without_causal_mask():
  """Every query sees every key of its document, whatever the layout."""
  mesh = make_mesh({"data": 2, "seq": 4}, jax.devices())
  q, k, v, seg = inputs(24, 4, 2)

  def dense(q, k, v):
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    s = jnp.where((seg[:, :, None] == seg[:, None, :])[:, None], s, -1e30)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)

  par = lambda q, k, v: ring_attention(q, k, v, seg, mesh=mesh, layout="contiguous", batch_axes=("data",),
                                       causal=False)
  check_against_reference(par, dense, (q, k, v))
