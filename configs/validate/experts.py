"""Mixture of experts: the `sharding.expert_*` fields against the mesh, the model and the backend.

Experts split over `sharding.expert_axes` (MoE Parallel Folding: any mesh axes, e.g. data,seq,expert)
and each expert's width over `sharding.expert_tensor_axes`; tokens reach them by
`sharding.expert_dispatch` through `sharding.expert_all_to_all`, in `sharding.expert_chunks` pieces.
The model's own MoE fields (experts, top-k, router groups) are checked in `model.py`.
"""

from __future__ import annotations

import importlib.util
import math

from configs.base import (BATCH_MESH_AXES, EXPERT_ALL_TO_ALL, EXPERT_DISPATCHES, GROUPED_MATMULS, MESH_AXES,
                          Config)
from configs.validate.require import require, require_choice


def _check_axes(field: str, axes: tuple[str, ...]) -> None:
  unknown = [a for a in axes if a not in MESH_AXES]
  require(not unknown, f"sharding.{field}={tuple(axes)}: {unknown} are not mesh axes (choose from {MESH_AXES})")
  require(len(set(axes)) == len(axes), f"sharding.{field}={tuple(axes)}: an axis appears twice")


def _hopper(backend: str) -> bool:
  if backend != "gpu":
    return False
  import jax  # noqa: PLC0415 (the device is only asked about on GPUs)
  return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")  # as mgpu_matmul.on_hopper


def check(config: Config, sizes: dict[str, int], backend: str) -> None:
  m, s = config.model, config.sharding
  require_choice(s.expert_dispatch, EXPERT_DISPATCHES, "sharding.expert_dispatch")
  require_choice(s.expert_all_to_all, EXPERT_ALL_TO_ALL, "sharding.expert_all_to_all")
  require_choice(s.grouped_matmul, GROUPED_MATMULS, "sharding.grouped_matmul")
  require(s.capacity_factor > 0, f"sharding.capacity_factor={s.capacity_factor}: must be > 0 "
                                 f"(slots per expert = factor x tokens x top_k / experts)")
  require(s.expert_chunks >= 1, f"sharding.expert_chunks={s.expert_chunks}: must be >= 1 (1: no chunking)")
  require(s.expert_all_to_all != "ragged" or backend != "cpu",
          "sharding.expert_all_to_all='ragged' needs a GPU or TPU (XLA:CPU has no ragged all-to-all): "
          "use 'padded' or 'auto'")
  require(s.grouped_matmul != "tokamax" or (backend == "gpu" and importlib.util.find_spec("tokamax") is not None),
          f"sharding.grouped_matmul='tokamax' needs a GPU and the tokamax package (backend {backend!r}): "
          f"use 'rounds', 'xla' or 'auto'")
  require(s.grouped_matmul != "mgpu" or _hopper(backend),
          f"sharding.grouped_matmul='mgpu' needs a GPU of compute capability 9.x (Hopper: warpgroup MMA and "
          f"TMA), backend {backend!r}: use 'rounds', 'xla' or 'auto'")
  if s.grouped_matmul == "mgpu":
    width = m.expert_d_ff // math.prod(sizes[a] for a in s.expert_tensor_axes)
    require(m.d_model % 128 == 0 and width % 128 == 0,
            f"sharding.grouped_matmul='mgpu' tiles model.d_model={m.d_model} and the expert width per device "
            f"({width}: model.expert_d_ff={m.expert_d_ff} over sharding.expert_tensor_axes) in 128s: both must be "
            f"multiples of 128")
  _check_axes("expert_axes", s.expert_axes)
  _check_axes("expert_tensor_axes", s.expert_tensor_axes)
  both = sorted(set(s.expert_axes) & set(s.expert_tensor_axes))
  require(not both, f"sharding.expert_axes={tuple(s.expert_axes)}, sharding.expert_tensor_axes="
                    f"{tuple(s.expert_tensor_axes)}: {both} in both (an axis splits experts or their width, not both)")
  token_axes = (*BATCH_MESH_AXES, "seq")
  split_tokens = [a for a in s.expert_tensor_axes if a in token_axes and sizes[a] > 1]
  require(not split_tokens, f"sharding.expert_tensor_axes={tuple(s.expert_tensor_axes)}: {split_tokens} split the "
                            f"tokens; expert-tensor parallelism needs the same tokens on every device of its axes")
  if m.n_experts == 0:
    require(sizes["expert"] == 1,
            f"mesh.expert={sizes['expert']} needs a mixture-of-experts model (model.n_experts > 0)")
    return
  require(sizes["expert"] == 1 or "expert" in s.expert_axes,
          f"mesh.expert={sizes['expert']}, but sharding.expert_axes={tuple(s.expert_axes)} leaves the expert axis idle")
  n_ep = math.prod(sizes[a] for a in s.expert_axes)
  require(m.n_experts % n_ep == 0, f"model.n_experts={m.n_experts} is not divisible by the expert axes "
                                   f"sharding.expert_axes={tuple(s.expert_axes)} ({n_ep} devices)")
  width, n_et = m.expert_d_ff or m.d_ff, math.prod(sizes[a] for a in s.expert_tensor_axes)
  require(width % n_et == 0, f"model.expert_d_ff={width} is not divisible by the expert-tensor axes "
                             f"sharding.expert_tensor_axes={tuple(s.expert_tensor_axes)} ({n_et} devices)")
  require(not ("fsdp" in s.expert_axes and sizes["fsdp"] > 1 and s.zero_stage > 0),
          f"sharding.expert_axes={tuple(s.expert_axes)} includes fsdp, which sharding.zero_stage={s.zero_stage} "
          f"already uses for the weights' embed dimension: leave fsdp out of the expert axes")
  require(not ("stage" in s.expert_axes and sizes["stage"] > 1),
          f"sharding.expert_axes={tuple(s.expert_axes)} includes stage, which splits the layers")
  split = tuple(dict.fromkeys(a for a in (*token_axes, *s.expert_axes) if sizes[a] > 1))
  devices = math.prod(sizes[a] for a in split)
  tokens = config.data.global_batch // max(config.data.microbatches, 1) * config.data.seq_len
  require(tokens % (devices * s.expert_chunks) == 0,
          f"sharding.expert_chunks={s.expert_chunks}: the {tokens} tokens of a microbatch (data.global_batch / "
          f"data.microbatches x data.seq_len) do not split into {devices} devices ({' x '.join(split) or 'one'}) x "
          f"{s.expert_chunks} chunks")
