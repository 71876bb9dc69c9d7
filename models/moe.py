"""The mixture-of-experts MLP, and which layers of a model are sparse.

`MoE` replaces a block's dense SwiGLU with routed experts (plus optional always-active shared
experts): a float32 router picks `experts_top_k` of `n_experts` experts per token
(`parallel.experts.routing.route`: softmax or sigmoid scores, group-limited routing, top-k
renormalisation, a routed scaling factor), and the plan's expert dispatch
(`parallel.experts.dispatch.experts_mlp`) sends each token to its experts and combines their
outputs. Shared experts (DeepSeek-MoE, Qwen2-MoE) are one fused SwiGLU of width
n_shared_experts x shared_expert_d_ff; Qwen2-MoE scales their output by sigmoid(x . shared_gate).

Auxiliary-loss-free balancing (DeepSeek-V3, Wang et al. 2024): `router_bias` [E] is added to the
scores for the selection only. It is a `RouterBias` variable, not a parameter: the optimizer never
sees it; the train step updates it from each step's load (`training.step`).

Parameters of one MoE layer (logical axes in brackets), as `models.hf_moe` maps them:
  router       [D, E]        ("embed", None)                      float32 in the forward pass
  w_gate/w_up  [E, D, F]     ("experts", "embed", "expert_mlp")
  w_down       [E, F, D]     ("experts", "expert_mlp", "embed")
  shared       w_gate/w_up [D, S*Fs] ("embed", "mlp"), w_down [S*Fs, D] ("mlp", "embed")  (S > 0)
  shared_gate  [D]           ("embed",)                           (model.shared_expert_gate)
  router_bias  [E]           (None,)                              RouterBias, not trained

Which layers are sparse (`is_sparse`): layer i (from 0) when i >= moe_first_dense and
(i + 1) % moe_every == 0 -- Qwen2/3-MoE's `mlp_only_layers` prefix and `decoder_sparse_step`,
DeepSeek's `first_k_dense_replace` (with moe_layer_freq 1), Mixtral's all-sparse (0, 1).
The model keeps two stacks (`models.transformer`): `layers` holds the dense-MLP blocks in order,
`moe_layers` the MoE blocks in order; `layer_slots` says which slot each layer is.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from configs import ModelConfig
from models.layers import MLP, param
from parallel.experts.dispatch import experts_mlp
from parallel.experts.losses import sequence_aux_loss, switch_aux_loss, z_loss
from parallel.experts.routing import Routing, route
from parallel.plan import ShardingPlan

# Per-layer outputs an MoE block returns through the layer-stack seam (scalars unless noted).
MOE_OUTPUTS = ("aux_loss", "seq_aux_loss", "z_loss", "tokens_per_expert", "dropped")


class RouterBias(nnx.Variable):
  """The auxiliary-loss-free balancing bias [E]: read by the router, updated outside the optimizer."""


def is_sparse(cfg: ModelConfig, layer: int) -> bool:
  """Whether layer `layer` (0-based) has an MoE MLP (see the module docstring for the rule)."""
  return cfg.n_experts > 0 and layer >= cfg.moe_first_dense and (layer + 1) % cfg.moe_every == 0


def layer_slots(cfg: ModelConfig) -> list[tuple[str, int]]:
  """For each layer in order: ("layers", j) for the j-th dense block or ("moe_layers", j) for the
  j-th MoE block, i.e. where its parameters sit in the stacked parameter tree."""
  out, counts = [], {"layers": 0, "moe_layers": 0}
  for i in range(cfg.n_layers):
    stack = "moe_layers" if is_sparse(cfg, i) else "layers"
    out.append((stack, counts[stack]))
    counts[stack] += 1
  return out


class StackLayout(NamedTuple):
  """How the two stacks interleave, so that each runs in a scan (compile time independent of depth).

  Layers run as: `prefix` dense blocks, then `groups` groups of (`every` - 1 dense blocks, then one
  MoE block), then `suffix` dense blocks (suffix < every). Every sparse-layer rule of `is_sparse`
  has this shape: the first sparse layer p0 has (p0 + 1) a multiple of `every`.
  """

  prefix: int
  groups: int
  every: int
  suffix: int


def stack_layout(cfg: ModelConfig) -> StackLayout:
  sparse = [i for i in range(cfg.n_layers) if is_sparse(cfg, i)]
  if not sparse:
    return StackLayout(cfg.n_layers, 0, 1, 0)
  every = cfg.moe_every
  prefix = sparse[0] + 1 - every
  return StackLayout(prefix, len(sparse), every, cfg.n_layers - 1 - sparse[-1])


def expert_width(cfg: ModelConfig) -> int:
  return cfg.expert_d_ff or cfg.d_ff


def shared_width(cfg: ModelConfig) -> int:
  """The fused shared experts' total width, n_shared_experts x (shared_expert_d_ff or expert width)."""
  return cfg.n_shared_experts * (cfg.shared_expert_d_ff or expert_width(cfg))


def _round_robin(routing: Routing, cfg: ModelConfig) -> Routing:
  """`model.router_force_balance` (benchmarks): token t's k-th pick is expert (t * K + k) mod E, its
  weight the router's score of that expert (renormalised and scaled as configured)."""
  t, k = routing.experts.shape
  experts = (jnp.arange(t, dtype=jnp.int32)[:, None] * k + jnp.arange(k, dtype=jnp.int32)) % cfg.n_experts
  weights = jnp.take_along_axis(routing.probs, experts, axis=-1)
  if cfg.router_topk_norm:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return Routing(weights * cfg.routed_scale, experts, routing.probs)


class MoE(nnx.Module):
  """x [B, L, D] -> (y [B, L, D] in the compute dtype, per-layer outputs `MOE_OUTPUTS`).

  y = routed_scale-weighted sum over each token's k experts of SwiGLU_e(x) (+ shared experts). The
  dispatch shards over the plan's batch/sequence and expert axes inside `experts_mlp`; the router,
  the shared experts and the losses are ordinary (automatically partitioned) array code.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, e, f = cfg.d_model, cfg.n_experts, expert_width(cfg)
    self.cfg = cfg
    self.dtype = jnp.dtype(cfg.compute_dtype)
    self.router = param(rngs, (d, e), ("embed", None), cfg)
    self.w_gate = param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), cfg)
    self.w_up = param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), cfg)
    self.w_down = param(rngs, (e, f, d), ("experts", "expert_mlp", "embed"), cfg)
    self.router_bias = RouterBias(jnp.zeros((e,), jnp.float32), logical_axes=(None,))
    if cfg.n_shared_experts:
      self.shared = MLP(dataclasses.replace(cfg, d_ff=shared_width(cfg)), rngs=rngs)
    if cfg.shared_expert_gate:
      self.shared_gate = param(rngs, (d,), ("embed",), cfg)

  def __call__(self, x_BxLxD: jax.Array, plan: ShardingPlan) -> tuple[jax.Array, dict]:
    cfg = self.cfg
    b, l, d = x_BxLxD.shape
    x_TxD = x_BxLxD.reshape(b * l, d)
    # The router in float32 at full precision: top-k picks are discontinuous in the scores.
    logits_TxE = jnp.einsum("td,de->te", x_TxD.astype(jnp.float32), self.router[...].astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)
    routing = route(logits_TxE, top_k=cfg.experts_top_k, score=cfg.router_score, bias_E=self.router_bias[...],
                    n_groups=cfg.router_groups, topk_groups=cfg.router_topk_groups,
                    normalize=cfg.router_topk_norm, scale=cfg.routed_scale)
    if cfg.router_force_balance:
      routing = _round_robin(routing, cfg)
    w = lambda p: p[...].astype(self.dtype)
    y_TxD, stats = experts_mlp(x_TxD.astype(self.dtype), routing, w(self.w_gate), w(self.w_up), w(self.w_down),
                               plan, compute_dtype=self.dtype)
    y = y_TxD.reshape(b, l, d).astype(self.dtype)
    if cfg.n_shared_experts:
      shared = self.shared(x_BxLxD, plan)
      if cfg.shared_expert_gate:
        gate = jnp.einsum("bld,d->bl", x_BxLxD.astype(jnp.float32), self.shared_gate[...].astype(jnp.float32))
        shared = (jax.nn.sigmoid(gate)[..., None] * shared.astype(jnp.float32)).astype(self.dtype)
      y = y + shared.astype(self.dtype)
    e, k = cfg.n_experts, cfg.experts_top_k
    # Batch axes a shard_map around this layer has made manual (a pipeline's executor runs each batch
    # shard's rows on its own): the losses are those of all the rows, as on one device.
    shards = plan.manual_activation_axes("batch")
    outputs = {
        "aux_loss": switch_aux_loss(routing.probs, routing.experts, e, shards),
        "seq_aux_loss": sequence_aux_loss(routing.probs.reshape(b, l, e), routing.experts.reshape(b, l, k), e, shards),
        "z_loss": z_loss(logits_TxE, shards),
        "tokens_per_expert": stats["tokens_per_expert"].astype(jnp.float32),
        "dropped": jnp.asarray(stats["dropped"], jnp.float32),
    }
    return y, outputs
