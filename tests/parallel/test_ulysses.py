"""DeepSpeed-Ulysses and USP against dense causal attention: forward and gradients, key/value
heads fewer than the devices (replicated), and the errors for heads that do not divide."""

import jax.numpy as jnp
import pytest

from parallel.attention.ulysses import ulysses_attention
from parallel.attention.usp import usp_attention
from parallel.mesh import make_mesh
from tests.parallel.context_cases import check_context_op, inputs


@pytest.mark.parametrize("mesh,heads,kv_heads", [("seq8", 8, 2), ("data2_seq4", 4, 1), ("data2_seq2_tensor2", 4, 2)])
def test_ulysses_matches_dense(mesh, heads, kv_heads):
  check_context_op(ulysses_attention, mesh, "contiguous", length=48 if mesh == "seq8" else 24, heads=heads,
                   kv_heads=kv_heads)


def test_ulysses_on_a_zigzag_sequence_bfloat16():
  check_context_op(ulysses_attention, "data2_seq4", "zigzag", length=24, dtype=jnp.bfloat16)


@pytest.mark.parametrize("mesh,ulysses,layout", [("seq8", 2, "zigzag"), ("seq8", 4, "striped"),
                                                 ("data2_seq4", 2, "zigzag"), ("data2_seq2_tensor2", 2, "zigzag")])
def test_usp_matches_dense(mesh, ulysses, layout):
  check_context_op(usp_attention, mesh, layout, length=48 if mesh == "seq8" else 24, ulysses=ulysses,
                   ring_divisor=ulysses)


def test_heads_that_do_not_divide_are_refused():
  mesh = make_mesh({"seq": 8})
  q, k, v, seg = inputs(48, 4, 2)
  with pytest.raises(ValueError, match=r"4 query heads per device \(of 4, over 1 tensor devices\) are not divisible by 8"):
    ulysses_attention(q, k, v, seg, mesh=mesh)
  with pytest.raises(ValueError, match=r"ulysses=3 must divide the 8 devices"):
    usp_attention(q, k, v, seg, mesh=mesh, ulysses=3)


def test_usp_bfloat16_mqa():
  check_context_op(usp_attention, "seq8", "zigzag", length=48, kv_heads=1, dtype=jnp.bfloat16, ulysses=2,
                   ring_divisor=2)
