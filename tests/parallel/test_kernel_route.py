"""The fused-kernel route without segment ids: plain causal attention with every block a kernel
call (`implementation="xla_kernels"`, the XLA twins of the cuDNN calls, as a GPU runs with
data.mask_documents=false). Each block's causal mask then comes from the ring's sub-blocks on the
block's local order (`ring.sub_blocks`), not from original indices as on the XLA route, so each
ring-style op and layout is checked here against dense causal attention written out below:
forward and the gradients of q, k and v, on 8 devices with 6 tokens per device.

One dense reference (forward and VJP) serves all twelve cases; each case compiles one program
that gives both its output and its gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallel.attention.allgather import allgather_attention
from parallel.attention.layout import LAYOUTS, permutation
from parallel.attention.ring import ring_attention
from parallel.attention.tokenring import tokenring_attention
from parallel.attention.usp import usp_attention
from parallel.mesh import make_mesh
from tests.reference import assert_close

B, L, H, K, D = 2, 48, 4, 2, 8
# name -> (op, extra arguments, devices per ring position): USP's ring runs over groups of two.
OPS = {"ring": (ring_attention, {}, 1), "tokenring": (tokenring_attention, {}, 1),
       "allgather": (allgather_attention, {}, 1), "usp": (usp_attention, {"ulysses": 2}, 2)}


def dense_causal(q, k, v):
  """Softmax attention, query i over keys 0..i, K/V heads repeated for the query groups."""
  k, v = (jnp.repeat(x, H // K, axis=2) for x in (k, v))
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") * D ** -0.5
  s = jnp.where(np.tril(np.ones((L, L), bool)), s, -jnp.inf)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v, precision="highest")


@pytest.fixture(scope="module")
def case():
  """Inputs in natural order, an output cotangent, and the dense output and gradients."""
  ks = jax.random.split(jax.random.key(7), 4)
  q = jax.random.normal(ks[0], (B, L, H, D))
  k, v = (jax.random.normal(x, (B, L, K, D)) for x in ks[1:3])
  ct = jax.random.normal(ks[3], q.shape)
  return (q, k, v, ct), *output_and_grads(dense_causal)(q, k, v, ct)


def output_and_grads(fn):
  """jit of (fn's output, the gradients of <output, ct> with respect to q, k and v)."""
  @jax.jit
  def run(q, k, v, ct):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(ct)
  return run


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", OPS)
def test_kernel_route_without_segment_ids_matches_dense_causal(case, name, layout):
  op, extra, per_position = OPS[name]
  mesh = make_mesh({"seq": 8})
  perm = permutation(layout, L, 8 // per_position)
  inverse = np.argsort(perm)

  def parallel(q, k, v):
    out = op(q[:, perm], k[:, perm], v[:, perm], None, mesh=mesh, axis="seq", layout=layout,
             implementation="xla_kernels", **extra)
    return out[:, inverse]

  args, want_out, want_grads = case
  out, grads = output_and_grads(parallel)(*args)
  assert_close(out, want_out, what=f"{name} {layout} output")
  assert_close(grads, want_grads, what=f"{name} {layout} gradients of q, k, v")
