"""Packed documents on the fused-kernel route (`documents.py`), run with the kernels' XLA twins
(`xla_kernels.py`): a block's own keys and an earlier block's, merged, against dense attention
written out here (forward, and the gradients of `jax.vjp` of it); then ring, TokenRing,
all-gather-KV and USP taking that route on the 8-device mesh against dense causal attention.
On a GPU the first test also runs on cuDNN (bfloat16)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallel.attention import cudnn_blocks, documents, xla_kernels
from parallel.attention.allgather import allgather_attention
from parallel.attention.blockwise import F32, NEG, merge
from parallel.attention.layout import permutation
from parallel.attention.ring import ring_attention
from parallel.attention.tokenring import tokenring_attention
from parallel.attention.usp import usp_attention
from parallel.mesh import make_mesh
from tests.parallel.context_cases import check_context_op, inputs
from tests.reference import assert_close

H, K, D = 4, 2, 8
LE, LO, TILE = 8, 12, 4  # earlier keys, own queries/keys, rows per tile (3 tiles)
# Per batch row, the documents' lengths over the LE + LO tokens. Row 0: a document runs from the
# earlier block into the own block's first tiles; tile 1 holds three documents, tiles 0 and 2 one
# (the fused branch needs every row's tile to hold one). Row 1: a document starts right at the
# own block, so nothing is shared with the earlier block.
DOCS = [[5, 9, 1, 5], [8, 12]]


def _segments():
  return jnp.asarray([np.repeat(np.arange(1, len(d) + 1), d) for d in DOCS], jnp.int32)


def _dense(q, k, v, mask):
  """(output, LSE) of softmax attention under `mask` [B, Lq, Lk], heads repeated for GQA."""
  k, v = (jnp.repeat(x, H // K, axis=2) for x in (k, v))
  s = jnp.einsum("bqhd,bshd->bhqs", q, k, precision="highest") * D ** -0.5
  s = jnp.where(mask[:, None], s, -jnp.inf)
  o = jnp.einsum("bhqs,bshd->bqhd", jax.nn.softmax(s, axis=-1), v, precision="highest")
  return o, jax.nn.logsumexp(s, axis=-1).transpose(0, 2, 1)


KERNELS = [pytest.param(xla_kernels, jnp.float32, id="xla_kernels"),
           pytest.param(cudnn_blocks, jnp.bfloat16, id="cudnn", marks=pytest.mark.skipif(
               not cudnn_blocks.available(), reason="cuDNN flash attention needs an NVIDIA GPU"))]


# Row 0's own block has 3 documents: 8 slots take it in one packed call; with 2, it splits into two
# pieces of 6 rows (1 and 2 documents), each one packed call; with 1, the second piece splits into
# tiles of 3 rows.
@pytest.mark.parametrize("slots", [8, 2, 1], ids=["packed", "pieces", "tiles"])
@pytest.mark.parametrize("kernels,dtype", KERNELS)
def test_own_and_earlier_blocks_merged_equal_dense_attention(monkeypatch, kernels, dtype, slots):
  monkeypatch.setattr(documents, "MAX_DOCUMENTS", slots)
  ks = jax.random.split(jax.random.key(3), 4)
  seg = _segments()
  q = jax.random.normal(ks[0], (2, LO, H, D)).astype(dtype)
  k, v = (jax.random.normal(x, (2, LE + LO, K, D)).astype(dtype) for x in ks[1:3])
  do = jax.random.normal(ks[3], q.shape).astype(dtype)
  idx = np.arange(LE + LO)
  mask = (idx[None, LE:, None] >= idx[None, None, :]) & (seg[:, LE:, None] == seg[:, None, :])
  f32 = lambda *xs: tuple(x.astype(F32) for x in xs)
  (want_o, want_lse), vjp = jax.vjp(lambda q, k, v: _dense(q, k, v, mask), *f32(q, k, v))
  want_grads = vjp((do.astype(F32), jnp.zeros_like(want_lse)))

  q_seg, kv_seg = seg[:, LE:], seg[:, :LE]
  own, earlier = (slice(LE, None), slice(None, LE))

  @jax.jit
  def blocks(q, k, v, do):  # forward merged, then each block's backward from the final rows
    oo, lo = documents.own_forward(kernels, q, k[:, own], v[:, own], q_seg, D ** -0.5, tile=TILE)
    oe, le = documents.earlier_forward(kernels, q, k[:, earlier], v[:, earlier], q_seg, kv_seg, D ** -0.5)
    o, lse = merge(oo, lo, oe, le)
    gq, gk, gv = documents.own_backward(kernels, q, k[:, own], v[:, own], q_seg, D ** -0.5, o, lse, do, tile=TILE)
    eq, ek, ev = documents.earlier_backward(kernels, q, k[:, earlier], v[:, earlier], q_seg, kv_seg, D ** -0.5,
                                            o, lse, do)
    return (o, lse), (oe, le), (gq + eq, jnp.concatenate([ek, gk], 1), jnp.concatenate([ev, gv], 1))

  with jax.default_matmul_precision("highest"):
    (o, lse), (oe, le), got = blocks(q, k, v, do)
  assert_close((o, lse), (want_o, want_lse), dtype, what="merged output and LSE")
  assert float(le[1].max()) == np.float32(NEG) and not oe[1].any(), "row 1 shares no document with the earlier block"
  assert_close(got, want_grads, dtype, what="gradients")


def test_tile_spans_the_one_document_test_and_packed_segments():
  seg = _segments()[:, LE:]  # row 0: [2]*6 + [3] + [4]*5; row 1: [2]*12
  lengths, starts, fits = documents.block_documents(seg, 4)
  assert lengths.tolist() == [[6, 1, 5, 0], [12, 0, 0, 0]] and starts.tolist() == [[0, 6, 7, 0], [0] * 4] and fits
  assert not documents.block_documents(seg, 2)[2]
  assert documents.tiles(LO, TILE) == 3 and documents.tiles(6, 4) == 2 and documents.tiles(7, 4) == 7
  p, start, s = documents._tile_span(seg, 8, TILE)
  assert (p.tolist(), start.tolist(), s.tolist()) == ([4, 4], [7, 0], [1, 8])
  assert [bool(documents._one_document(seg[:, i:i + TILE])) for i in (0, 4, 8)] == [True, False, True]


def test_packed_slots_and_pieces_keep_the_workspace_under_its_cap():
  assert documents.PACKED_WORKSPACE == 8 << 30 and documents.MAX_DOCUMENTS == 64
  assert documents.packed_slots((1, 16384, 16, 128)) == 32  # 8 GiB / (8 x 16384 x 16 x 128 bytes)
  assert documents.packed_slots((2, 16384, 16, 128)) == 16
  assert documents.packed_slots((1, 1024, 8, 64)) == 64
  assert documents.packed_slots((1, 1 << 20, 16, 128)) == 0  # pieces
  assert documents._piece_length((1, 32768, 16, 128), 1024) == 8192  # 64 slots of 8,192 rows: 8 GiB
  assert documents._piece_length((1, 12, 4, 8), 4) == 6  # at most half the block
  assert documents._piece_length((1, 4096, 16, 128), 2048) == 0  # no piece above the tile


@pytest.mark.parametrize("op,mesh,layout,slots,tile,kwargs", [
    (ring_attention, "seq8", "zigzag", 0, 6, {}),
    (ring_attention, "data2_seq4", "contiguous", 1, 4, {}),
    (tokenring_attention, "data2_seq2_tensor2", "zigzag", 1, 4, {}),
    (allgather_attention, "seq8", "zigzag", 32, 4, {}),
    (usp_attention, "seq8", "zigzag", 1, 4, {"ulysses": 2, "ring_divisor": 2}),
], ids=["ring", "ring_contiguous", "tokenring", "allgather", "usp"])
def test_ops_on_the_kernel_route_match_dense(monkeypatch, op, mesh, layout, slots, tile, kwargs):
  """Own blocks of 6 or 12 tokens per device. `slots` documents per own block take one packed
  call (0: none; 1: the devices whose block holds one document), the others tiles of `tile` or
  fewer rows: with the documents of `context_cases.inputs`, tiles of one document and of several,
  and spans into a tile, all occur (one tile of 6 rows puts a zigzag device's two chunks, from
  two documents, in one tile)."""
  monkeypatch.setattr(documents, "MAX_DOCUMENTS", slots)
  monkeypatch.setattr(documents, "TILE", tile)
  check_context_op(op, mesh, layout, length=48 if mesh == "seq8" else 24, implementation="xla_kernels", **kwargs)


def test_segment_ids_out_of_order_are_refused_on_the_kernel_route():
  mesh = make_mesh({"seq": 8})
  q, k, v, seg = inputs(48, 4, 2)
  perm = permutation("zigzag", 48, 8)
  backwards = (seg.max() + 1 - seg)[:, perm]  # documents numbered from the end
  for op, extra in ((ring_attention, {}), (usp_attention, {"ulysses": 2})):
    with pytest.raises(ValueError, match="non-decreasing"):
      op(q, k, v, backwards, mesh=mesh, layout="zigzag", implementation="xla_kernels", **extra)

