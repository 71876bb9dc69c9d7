"""The experts' SwiGLU feed-forward, down(silu(x gate) * (x up)), in two layouts:

  batched  [E, C, D] slots per expert (capacity dispatch): dense batched matmuls;
  grouped  [M, D] rows sorted by expert with per-expert counts (dropless): grouped matmuls, or
           (impl "tiled") batched matmuls over expert-aligned tiles of those rows (tiled.py), or
           (impl "rounds") batched matmuls over [E, C, D] slots in rounds (rounds.py).

Both compute in the inputs' dtype, with silu(gate) * up in float32 (as the dense MLP).
Under expert-tensor parallelism the weights hold a slice of F: the result is a partial sum that
the caller reduces over the expert-tensor axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from parallel.experts.grouped_matmul import grouped_matmul, resolve
from parallel.experts.rounds import rounds_ffn
from parallel.experts.tiled import tiled_ffn


def _swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  return (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(gate.dtype)


def batched_ffn(x_ExCxD: jax.Array, w_gate_ExDxF: jax.Array, w_up_ExDxF: jax.Array,
                w_down_ExFxD: jax.Array) -> jax.Array:
  """[E, C, D] -> [E, C, D]: expert e's FFN on its C slots."""
  # Named so that a rematerialising caller (tiled.py) can keep them and recompute the rest.
  gate = checkpoint_name(jnp.einsum("ecd,edf->ecf", x_ExCxD, w_gate_ExDxF), "expert_gate")
  up = checkpoint_name(jnp.einsum("ecd,edf->ecf", x_ExCxD, w_up_ExDxF), "expert_up")
  return jnp.einsum("ecf,efd->ecd", _swiglu(gate, up), w_down_ExFxD)


def grouped_ffn(rows_MxD: jax.Array, group_sizes_E: jax.Array, w_gate_ExDxF: jax.Array, w_up_ExDxF: jax.Array,
                w_down_ExFxD: jax.Array, impl: str = "xla", expected_rows: int | None = None) -> jax.Array:
  """[M, D] rows sorted by expert (expert e's group_sizes[e] rows together) -> [M, D].
  `expected_rows` (rounds only; default M): the real rows expected when M counts padding."""
  impl = resolve(impl)
  if impl == "rounds":
    return rounds_ffn(rows_MxD, group_sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, batched_ffn,
                      expected_rows=expected_rows)
  if impl == "tiled":
    return tiled_ffn(rows_MxD, group_sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, batched_ffn)
  gate = grouped_matmul(rows_MxD, w_gate_ExDxF, group_sizes_E, impl)
  up = grouped_matmul(rows_MxD, w_up_ExDxF, group_sizes_E, impl)
  return grouped_matmul(_swiglu(gate, up), w_down_ExFxD, group_sizes_E, impl)


def check_expert_args(x_TxD: jax.Array, weights_TxK: jax.Array, experts_TxK: jax.Array, w_gate_ExDxF: jax.Array,
                      w_up_ExDxF: jax.Array, w_down_ExFxD: jax.Array) -> None:
  """ValueErrors for inputs of mismatched shapes (every dispatch op calls this first)."""
  if x_TxD.ndim != 2:
    raise ValueError(f"tokens must be [T, D], got shape {x_TxD.shape}")
  t, d = x_TxD.shape
  if weights_TxK.ndim != 2 or weights_TxK.shape[0] != t or experts_TxK.shape != weights_TxK.shape:
    raise ValueError(f"routing weights {weights_TxK.shape} and experts {experts_TxK.shape} must both be [T={t}, K]")
  if not jnp.issubdtype(experts_TxK.dtype, jnp.integer):
    raise ValueError(f"expert ids must be integers, got {experts_TxK.dtype}")
  if w_gate_ExDxF.ndim != 3 or w_gate_ExDxF.shape[1] != d or w_up_ExDxF.shape != w_gate_ExDxF.shape:
    raise ValueError(f"w_gate {w_gate_ExDxF.shape} and w_up {w_up_ExDxF.shape} must both be [E, D={d}, F]")
  e, _, f = w_gate_ExDxF.shape
  if w_down_ExFxD.shape != (e, f, d):
    raise ValueError(f"w_down {w_down_ExFxD.shape} must be [E, F, D] = {(e, f, d)}")
  if weights_TxK.shape[1] > e:
    raise ValueError(f"top-k {weights_TxK.shape[1]} is above the {e} experts")
