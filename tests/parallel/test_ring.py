"""Ring attention against dense causal attention: every layout, GQA and MQA, packed documents,
6 or 12 tokens per device, float32 and bfloat16, forward and gradients."""

import jax.numpy as jnp
import pytest

from parallel.attention.ring import ring_attention
from tests.parallel.context_cases import check_context_op


@pytest.mark.parametrize("mesh", ["seq8", "data2_seq4", "data2_seq2_tensor2"])
@pytest.mark.parametrize("layout", ["zigzag", "striped", "contiguous"])
def test_ring_matches_dense(mesh, layout):
  length = 48 if mesh == "seq8" else 24
  check_context_op(ring_attention, mesh, layout, length=length)


def test_ring_mqa_without_documents():
  check_context_op(ring_attention, "seq8", "zigzag", length=48, heads=4, kv_heads=1, segments=False)


def test_ring_bfloat16():
  check_context_op(ring_attention, "data2_seq4", "zigzag", length=24, dtype=jnp.bfloat16)
