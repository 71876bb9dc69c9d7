"""Chunked decayed linear attention and LASP-2 against the token-by-token recurrence: packed
documents, GQA, chunks that do and do not divide the length, every mesh, forward and gradients;
the recurrence itself against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallel.attention.layout import permutation
from parallel.linear.lasp2 import lasp2_attention
from parallel.linear.linear_attention import decay_rates, linear_attention
from parallel.mesh import make_mesh
from tests.parallel.context_cases import MESHES, inputs
from tests.parallel.linear_reference import recurrent_linear_attention
from tests.reference import check_against_reference


def test_recurrence_matches_numpy_loop():
  q, k, v, seg = inputs(12, 4, 2, batch=2, dim=4)
  decay = decay_rates(2)
  got = recurrent_linear_attention(q, k, v, seg, decay)
  qn, kn, vn, sn = (np.asarray(x, np.float64) for x in (q, k, v, seg))
  want = np.zeros(got.shape)
  for b in range(2):
    state = np.zeros((2, 4, 4))
    for t in range(12):
      cont = t > 0 and sn[b, t] == sn[b, t - 1]
      state = (decay[:, None, None] if cont else 0.0) * state + np.einsum("kd,ke->kde", kn[b, t], vn[b, t])
      for h in range(4):
        want[b, t, h] = qn[b, t, h] / 2.0 @ state[h // 2]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("length,chunk,kv_heads,segments", [(48, 8, 2, True), (48, 7, 1, True), (40, 16, 4, False)])
def test_chunked_matches_recurrence(length, chunk, kv_heads, segments):
  q, k, v, seg = inputs(length, 4, kv_heads)
  decay = jnp.asarray(decay_rates(kv_heads))
  seg = seg if segments else None
  check_against_reference(lambda q, k, v: linear_attention(q, k, v, seg, decay, chunk=chunk),
                          lambda q, k, v: recurrent_linear_attention(q, k, v, seg, decay), (q, k, v))


@pytest.mark.parametrize("mesh,layout,dtype", [("seq8", "zigzag", jnp.float32), ("seq8", "contiguous", jnp.float32),
                                               ("data2_seq4", "zigzag", jnp.float32),
                                               ("data2_seq2_tensor2", "zigzag", jnp.float32),
                                               ("data2_seq4", "zigzag", jnp.bfloat16)])
def test_lasp2_matches_recurrence(mesh, layout, dtype):
  sizes, batch_axes, head_axes = MESHES[mesh]
  m = make_mesh(sizes, jax.devices()[:int(np.prod(list(sizes.values())))])
  length = 48 if mesh == "seq8" else 24
  q, k, v, seg = inputs(length, 4, 2, dtype)
  decay = jnp.asarray(decay_rates(2))
  perm = permutation(layout, length, m.shape["seq"])
  inverse = np.argsort(perm)

  def parallel(q, k, v):
    out = lasp2_attention(q[:, perm], k[:, perm], v[:, perm], seg[:, perm], decay, mesh=m, layout=layout,
                          batch_axes=batch_axes, head_axes=head_axes, chunk=2)
    return out[:, inverse]

  check_against_reference(parallel, lambda q, k, v: recurrent_linear_attention(q, k, v, seg, decay), (q, k, v),
                          dtype=dtype)


def test_lasp2_without_documents_and_striped_refused():
  m = make_mesh({"seq": 8})
  q, k, v, _ = inputs(48, 4, 1)
  decay = jnp.asarray(decay_rates(1))
  perm = permutation("zigzag", 48, 8)
  par = lambda q, k, v: lasp2_attention(q[:, perm], k[:, perm], v[:, perm], None, decay, mesh=m)[:, np.argsort(perm)]
  check_against_reference(par, lambda q, k, v: recurrent_linear_attention(q, k, v, None, decay), (q, k, v))
  with pytest.raises(ValueError, match="layout 'striped' interleaves tokens"):
    lasp2_attention(q, k, v, None, decay, mesh=m, layout="striped")
