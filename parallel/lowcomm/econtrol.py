"""EControl over `replica` (Gao, Islamov, Stich 2024, "EControl: Fast Distributed Optimization
with Compression and Error Control"): top-k compressed gradient exchange whose error feedback is
regulated by a strength eta, feeding the repo's AdamW.

Per-step data parallelism across `replica`, called INSIDE a `jax.shard_map` manual over `axis`
with each island's own (not replica-averaged) gradients g_i. Each replica keeps h_i (its running
estimate of its gradient, as in EF21) and e_i (the error: what it meant to send minus what the
optimizer received); every replica keeps the same average h = mean_i h_i.

  delta_i = TopK(eta e_i + g_i - h_i)                 the only thing replica i sends
  delta   = mean_i delta_i                             all_gather of (values, indices), averaged locally
  v       = h + delta                                  the gradient estimate, the same on every replica
  e_i    <- e_i + g_i - h_i - delta_i;  h_i <- h_i + delta_i;  h <- h + delta

eta = 1 with h = 0 would be classical error feedback (EF), eta = 0 is EF21; EControl's eta in
between keeps the error from feeding back too strongly. The estimate v then goes through the same
AdamW as `training/optimizer.py` (global-norm clipping, bias-corrected moments, masked decoupled
weight decay), on every replica alike, so parameters stay identical without being sent.

Warm-up (step < freeze_step): the gradients are averaged in full precision (one psum), v is that
average, and h_i = g_i, h = v (the paper's initialisation h_i = g_i at the start of compression).

What crosses `axis` is spread over the island's devices as in `outer.island_flat`: a leaf of L
values is [d, ceil(L / d)] over the island's d devices, and each device selects the top-k of its
own row (a nested shard_map manual over the island's axes) and sends only that.

Bytes per replica and step (its collectives' operands over `axis`, summed over the island's
devices): warm-up `outer.padded_bytes` (4 L per leaf, padded); then d k (4 + 4) per leaf,
k = topk_count(ceil(L / d), fraction) (float32 values, int32 indices).

State (`EControlState`, one replica's, every field like params): m, v, h (the same on every
replica), h_local and error (the replica's own). As with `training/lowcomm.py`'s outer state, the
caller keeps one copy per replica (a leading [replicas] dimension split over `axis`) and passes
each replica its own; outputs follow the inputs' types (see `onebit_adam.match_vma`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from parallel.lowcomm import compress, outer
from parallel.lowcomm.adamw import AdamWRule
from parallel.lowcomm.onebit_adam import match_vma, on_island_rows

F32 = jnp.float32


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("m", "v", "h", "h_local", "error"), meta_fields=())
@dataclasses.dataclass(frozen=True)
class EControlState:
  m: Any  # AdamW first moment, like params, float32
  v: Any  # AdamW second moment
  h: Any  # mean over replicas of h_local, the same on every replica
  h_local: Any  # this replica's
  error: Any  # this replica's


@dataclasses.dataclass(frozen=True)
class EControl(AdamWRule):
  """EControl's update rule (AdamW's keyword fields from `AdamWRule`). `fraction`: top-k fraction
  of each leaf sent per step; `eta`: the error-control strength. `update` runs inside the
  shard_map over `axis`."""

  eta: float
  fraction: float
  freeze_step: int = 0

  def __post_init__(self):
    compress.topk_count(1, self.fraction)  # raises on a fraction outside (0, 1]
    if self.eta < 0:
      raise ValueError(f"EControl: eta={self.eta} must be >= 0")

  @classmethod
  def from_config(cls, optimizer_cfg: Any, lowcomm_cfg: Any, decay_mask: Any = None) -> EControl:
    """From the `optimizer` and `lowcomm` config sections (econtrol_eta, topk_fraction, freeze_step)."""
    c = lowcomm_cfg
    return cls(eta=c.econtrol_eta, fraction=c.topk_fraction, freeze_step=c.freeze_step, decay_mask=decay_mask,
               **cls.adamw_fields(optimizer_cfg))

  def init(self, params: Any) -> EControlState:
    """One replica's initial state (zeros)."""
    zeros = lambda: jax.tree.map(lambda p: jnp.zeros(p.shape, F32), params)
    return EControlState(m=zeros(), v=zeros(), h=zeros(), h_local=zeros(), error=zeros())

  def sent_bytes(self, params: Any, *, compressed: bool, island: int = 1) -> int:
    """Bytes one replica (its island of `island` devices) sends per step, warm-up or compressed."""
    if not compressed:
      return sum(-(-p.size // island) * island * 4 for p in jax.tree.leaves(params))
    return sum(island * 8 * compress.topk_count(-(-p.size // island), self.fraction) for p in jax.tree.leaves(params))

  def update(self, grads_local: Any, state: EControlState, params: Any, *, axis: str, step: Any,
             lr: Any) -> tuple[Any, EControlState, jax.Array]:
    """One step from this replica's gradients. step: 0-based count of updates done; lr: this
    step's learning rate. Returns (params, state, bytes sent by this replica: float32)."""
    t = jnp.asarray(step, jnp.int32) + 1
    grads = jax.tree.map(lambda g: g.astype(F32), grads_local)

    def warm(state):
      mean, _ = outer.replica_mean(grads, axis)
      return match_vma((mean, dataclasses.replace(state, h=mean, h_local=grads)), (params, state), axis)

    def compressed(state):
      def row(target_row):
        sparse = compress.topk(target_row, self.fraction)
        return compress.densify(sparse), compress.gather_mean(sparse, compress.densify, axis)[0]

      def leaf(g, h, h_i, e_i):
        target = self.eta * e_i + g - h_i
        delta_i, delta = (outer.from_island_flat(x, g) for x in on_island_rows(row, target))
        return h + delta, e_i + g - h_i - delta_i, h_i + delta_i

      out = jax.tree.map(leaf, grads, state.h, state.h_local, state.error)
      is_out = lambda x: isinstance(x, tuple)
      estimate = jax.tree.map(lambda o: o[0], out, is_leaf=is_out)
      new_state = dataclasses.replace(state, h=estimate, error=jax.tree.map(lambda o: o[1], out, is_leaf=is_out),
                                      h_local=jax.tree.map(lambda o: o[2], out, is_leaf=is_out))
      return match_vma((estimate, new_state), (params, state), axis)

    estimate, state = jax.lax.cond(t <= self.freeze_step, warm, compressed, state)
    new_params, m, v = self.adamw(estimate, state.m, state.v, params, t=t, lr=lr)
    island = outer.island_size()
    sent = jnp.where(t <= self.freeze_step, jnp.float32(self.sent_bytes(params, compressed=False, island=island)),
                     jnp.float32(self.sent_bytes(params, compressed=True, island=island)))
    return new_params, dataclasses.replace(state, m=m, v=v), sent
