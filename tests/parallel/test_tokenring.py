"""TokenRing against dense causal attention: forward and the backward the paper's code lacks."""

import jax.numpy as jnp
import pytest

from parallel.attention.tokenring import tokenring_attention
from tests.parallel.context_cases import check_context_op


@pytest.mark.parametrize("mesh", ["seq8", "data2_seq4", "data2_seq2_tensor2"])
@pytest.mark.parametrize("layout", ["zigzag", "striped"])
def test_tokenring_matches_dense(mesh, layout):
  check_context_op(tokenring_attention, mesh, layout, length=48 if mesh == "seq8" else 24)


def test_tokenring_mqa_without_documents():
  check_context_op(tokenring_attention, "data2_seq4", "zigzag", length=24, kv_heads=1, segments=False)


def test_tokenring_bfloat16():
  check_context_op(tokenring_attention, "data2_seq4", "zigzag", length=24, dtype=jnp.bfloat16)
