"""Expert parallelism and MoE Parallel Folding (Liu et al. 2025, Megatron-Core) as a rule fragment.

Routed-expert weights name two dimensions of their own: `experts` (which expert) and `expert_mlp`
(each expert's hidden width). Mapping them here, apart from attention's `heads`/`mlp`, is what
folding is: the MoE layers may split experts over e.g. `data x seq x expert` while attention uses
`seq` for context parallelism and `tensor` for its heads, with no change to the model.
"""

from __future__ import annotations

from parallel.rules import MeshAxes


def expert_rules(expert_axes: tuple[str, ...] = ("expert",),
                 expert_tensor_axes: tuple[str, ...] = ("tensor",)) -> dict[str, MeshAxes]:
  """`experts` over the expert axes (outermost first), `expert_mlp` over the expert-tensor axes."""
  overlap = set(expert_axes) & set(expert_tensor_axes)
  if overlap:
    raise ValueError(f"mesh axes {sorted(overlap)} are in both the expert axes {expert_axes} and the "
                     f"expert-tensor axes {expert_tensor_axes}")
  return {"experts": tuple(expert_axes) or None, "expert_mlp": tuple(expert_tensor_axes) or None}
