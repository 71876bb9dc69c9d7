"""Megatron-LM tensor parallelism (Shoeybi et al. 2019) and its sequence parallelism (Korthikanti
et al. 2022) as rule tables.

Tensor parallelism splits attention heads, MLP hidden units and (optionally) the vocabulary over
`tensor`: q/k/v and gate/up are column-parallel, the output projections row-parallel, and XLA
inserts one all-reduce after each row-parallel matmul. Sequence parallelism also splits the
residual stream and its norms on length over `tensor`, so each all-reduce becomes a
reduce-scatter and an all-gather precedes the next column-parallel matmul.
"""

from __future__ import annotations

from configs.base import BATCH_MESH_AXES
from parallel.rules import MeshAxes, Rules


def tensor_rules(vocab_parallel: bool = True) -> dict[str, MeshAxes]:
  """Where weights' dimensions go under tensor parallelism; everything else is replicated."""
  return {"layers": None, "embed": None, "head_dim": None,
          "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
          "vocab": "tensor" if vocab_parallel else None}


def activation_rules(weights: Rules, sequence_parallel: bool = False) -> dict[str, MeshAxes]:
  """Activations: batch over the data axes, heads/mlp/vocab as the weights, length over `seq`
  (context parallelism; nothing when the axis has size 1), and the residual stream's length
  (`residual_length`) also over `tensor` under sequence parallelism."""
  return {**weights, "batch": BATCH_MESH_AXES, "length": "seq",
          "residual_length": ("seq", "tensor") if sequence_parallel else "seq"}
