"""The layer stack as a seam: one layer as a pure function, and a replaceable `run_layers`.

A layer function is `layer_fn(layer_params, carry, layer_inputs) -> (carry, layer_outputs)`:
  layer_params   one layer's parameters, a pure dict (a slice of the stacked [layers, ...] tree)
  carry          the activation passed from layer to layer (see `models.block.Block`)
  layer_inputs   what each layer gets of its own (None for dense blocks; a KV-cache slice for a
                 decoder, a layer kind for hybrid models)
  layer_outputs  a dict each layer returns for the loss (empty for dense blocks; router losses
                 and expert load for experts), stacked on a leading `layers` axis by `scan_layers`

`make_layer_fn` applies the two things every runner wants done per layer: the ZeRO gather of that
layer's weights into the layout it computes in, and rematerialisation. `scan_layers` runs the
stack with `jax.lax.scan` (compile time independent of depth); a pipeline schedule runs slices of
the same stacked parameters through the same layer function on its stages instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from parallel.plan import ShardingPlan

Params = dict[str, Any]
Carry = dict[str, Any]
LayerFn = Callable[[Params, Carry, Any], tuple[Carry, dict]]


def _save_dots_and_attention(prim, *args, **params) -> bool:
  """Keeps matmul outputs and the flash-attention kernel's outputs (and softmax statistics), so
  the backward pass recomputes only cheap elementwise work, not the attention forward."""
  if prim.name.startswith("dot_product_attention_fwd"):
    return True
  return jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params)


REMAT_POLICIES = {
    "full": None,  # save nothing but each block's input
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_and_attention": _save_dots_and_attention,
}


def gather_for_compute(layer_params: Params, layer_axes: Any, plan: ShardingPlan) -> Params:
  """One layer's weights pinned to the `params` table's layout: where they are computed with.

  Under ZeRO-1/2 with mixed precision the master weights live sharded with the optimizer state,
  so this is where each layer's (compute-dtype) weights are all-gathered, one layer at a time.
  """
  return jax.tree.map(plan.pin_to_params_layout, layer_params, layer_axes)


def make_layer_fn(block_graphdef: nnx.GraphDef, layer_axes: Any, *, plan: ShardingPlan, remat: str = "none",
                  prevent_cse: bool = False) -> LayerFn:
  """The pure layer function of a block module.

  Args:
    block_graphdef: `nnx.split` of the stacked block module (its structure; no arrays).
    layer_axes: logical axes of one layer's parameters (without `layers`), shaped like them.
    remat: a key of REMAT_POLICIES, or "none".
    prevent_cse: needed when layers are unrolled side by side, or XLA merges the recomputation
      with the forward pass and remat vanishes; a rolled scan needs no barrier.
  """
  def apply_block(layer_params, carry, layer_inputs):
    return nnx.merge(block_graphdef, layer_params)(carry, layer_inputs, plan)

  if remat != "none":
    apply_block = jax.checkpoint(apply_block, policy=REMAT_POLICIES[remat], prevent_cse=prevent_cse)

  def layer_fn(layer_params, carry, layer_inputs):
    # Outside remat, so the gather is done once per step and its result kept for the backward.
    return apply_block(gather_for_compute(layer_params, layer_axes, plan), carry, layer_inputs)

  return layer_fn


def scan_layers(layer_fn: LayerFn, stacked_params: Params, carry: Carry, layer_inputs: Any = None, *,
                unroll: int = 1) -> tuple[Carry, dict]:
  """Runs every layer in order with `jax.lax.scan`; returns the last carry and the stacked outputs."""
  def body(c, xs):
    params, inputs = xs
    return layer_fn(params, c, inputs)

  return jax.lax.scan(body, carry, (stacked_params, layer_inputs), unroll=unroll)
