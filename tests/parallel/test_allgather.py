"""All-gather-KV context parallelism against dense causal attention: forward and gradients."""

import jax.numpy as jnp
import pytest

from parallel.attention.allgather import allgather_attention
from tests.parallel.context_cases import check_context_op


@pytest.mark.parametrize("mesh", ["seq8", "data2_seq4", "data2_seq2_tensor2"])
def test_allgather_matches_dense(mesh):
  check_context_op(allgather_attention, mesh, "zigzag", length=48 if mesh == "seq8" else 24)


def test_allgather_striped_mqa_without_documents():
  check_context_op(allgather_attention, "seq8", "striped", length=48, kv_heads=1, segments=False)


def test_allgather_bfloat16():
  check_context_op(allgather_attention, "data2_seq4", "zigzag", length=24, dtype=jnp.bfloat16)
