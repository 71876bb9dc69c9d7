"""1-bit Adam over `replica` (Tang et al. 2021, "1-bit Adam: Communication Efficient Large-Scale
Training with Adam's Convergence Speed"; the compressed all-reduce of DeepSpeed's OnebitAdam).

Per-step data parallelism across `replica`, called INSIDE a `jax.shard_map` manual over `axis`
with each island's own (not replica-averaged) gradients:

- warm-up (step < freeze_step): the repo's AdamW exactly (`training/optimizer.py`: global-norm
  clipping, then `optax.adamw` with bias correction and masked decoupled weight decay) on the
  gradient averaged over `axis` by one full-precision all-reduce (psum: the gradients' bytes).
- compression (step >= freeze_step, steps counted from 0): the variance v is frozen (bias-corrected at the freeze step).
  Each replica updates the momentum with its LOCAL (locally clipped) gradient,
  m_i = b1 m + (1 - b1) g_i, and the momenta are averaged by the error-compensated 1-bit
  all-reduce (`compressed_allreduce`), after which m is the same on every replica and the step is
  p -= lr (m_hat / (sqrt(v_hat) + eps) + wd * mask * p), m_hat = m / (1 - b1^t).

The compressed all-reduce runs on each island device's row of a leaf (`outer.island_flat`: a leaf
of L values as [d, ceil(L / d)] over the island's d devices, a nested shard_map manual over the
island's axes), so each device compresses and sends only its own row. Per row of L values
(padded to Lp, a multiple of 8 n):
  worker:  c_i = m_i + e_i; sends sign(c_i) (1 bit each) and s_i = mean|c_i|; e_i = c_i - s_i sign(c_i)
  exchange: all_to_all of the packed signs (replica j receives everyone's bits of chunk j, Lp / n
           values) and all_gather of the n worker scales
  server j: a_j = mean_i s_i sign(c_i)[chunk j]; c = a_j + E_j; sends sign(c) and S_j = mean|c|;
           E_j = c - S_j sign(c)
  all_gather of the servers' packed signs and scales: every replica rebuilds the same momentum.
Bytes per replica and leaf (the operands of its collectives over `axis`, summed over the island's
devices): d (Lp/8 + 4 + Lp/(8 n) + 4) with Lp the padded row, against 4 L for a float32
all-reduce (about 32 / (1 + 1/n) times fewer). With several devices per island the compression is
per row (one scale per device's row), so the numbers depend on the island's size.

The scales are mean|c|, the s minimising ||c - s sign(c)|| (as in EF-SignSGD); DeepSpeed uses
the RMS ||c|| / sqrt(L). Error compensation makes either work; the numbers differ.

State (`OneBitAdamState`, one replica's, every field float32 like params): m, v (the same on
every replica), `worker_error` and `server_error` (this replica's server chunk of each row, kept in
place in a params-shaped buffer, zeros elsewhere, so the state's shapes do not depend on the
mesh). As with `training/lowcomm.py`'s outer state, the caller keeps one copy per replica (a
leading [replicas] dimension split over `axis`) and passes each replica its own; params may come in
either way (the same everywhere, typed invariant, or one copy per replica): outputs follow the
inputs' types.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from parallel.lowcomm import compress, outer
from parallel.lowcomm.adamw import AdamWRule, adamw_step, clip_by_global_norm

F32 = jnp.float32


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("m", "v", "worker_error", "server_error"), meta_fields=())
@dataclasses.dataclass(frozen=True)
class OneBitAdamState:
  m: Any  # like params, float32, the same on every replica
  v: Any  # like params, float32, the same on every replica (frozen after freeze_step)
  worker_error: Any  # like params, float32
  server_error: Any  # like params, float32: this replica's server chunks, zeros elsewhere


def padded_size(size: int, replicas: int) -> int:
  """Lp: a leaf's flattened length padded so that it splits into `replicas` chunks of whole bytes."""
  return -(-size // (8 * replicas)) * 8 * replicas


def _varying_axes(x: Any) -> frozenset:
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # JAX 0.10; older releases name it `vma`
  return manual.varying if manual is not None else aval.vma


def match_vma(tree: Any, like: Any, axis: str) -> Any:
  """Marks leaves of `tree` varying over `axis` where the matching leaf of `like` is (the two
  branches of a `lax.cond` must agree; a value averaged over `axis` comes out invariant)."""
  def one(x, ref):
    if axis in _varying_axes(ref) and axis not in _varying_axes(x):
      return jax.lax.pcast(x, axis, to="varying")
    return x
  return jax.tree.map(one, tree, like)


def compressed_allreduce(x: jax.Array, worker_error: jax.Array, server_error: jax.Array, *, axis: str,
                         valid: Any = None) -> tuple[jax.Array, jax.Array, jax.Array, int]:
  """The error-compensated 1-bit average of x over `axis` (inside a shard_map manual over it).

  x: this replica's array (any shape, L values); worker_error: float32 like x; server_error:
  float32 [Lp / n] for this replica's chunk; valid: how many leading values of x.ravel() are real
  (default all; the rest is padding: no part in the scales, zero error). Returns (average,
  identical on every replica, float32 in x's shape; new worker_error; new server_error; bytes
  this replica sent).
  """
  n = jax.lax.axis_size(axis)
  size = x.size
  lp = padded_size(size, n)
  chunk = lp // n
  valid = size if valid is None else valid
  real = jnp.arange(size) < valid
  corrected = jnp.where(real, x.astype(F32).ravel() + worker_error.ravel(), 0.0)
  scale = jnp.sum(jnp.abs(corrected)) / jnp.maximum(valid, 1)  # mean |.|: the L2-optimal scale of signs
  new_worker_error = jnp.where(real, corrected - scale * jnp.where(corrected >= 0, 1.0, -1.0), 0.0)
  bits = jnp.pad((corrected >= 0).astype(jnp.uint8), (0, lp - size))
  packed = compress.pack_codes(bits, 1).reshape(n, chunk // 8)
  received = jax.lax.all_to_all(packed, axis, 0, 0, tiled=True)  # [n, chunk / 8]: row i from replica i
  worker_scales = jax.lax.all_gather(scale, axis)  # [n]
  bits = jax.vmap(lambda b: compress.unpack_codes(b, 1))(received).astype(F32)
  average = jnp.mean(worker_scales[:, None] * (2.0 * bits - 1.0), axis=0)  # [chunk]

  mine = jax.lax.axis_index(axis) * chunk + jnp.arange(chunk) < valid
  server_in = jnp.where(mine, average + server_error, 0.0)
  server_scale = jnp.sum(jnp.abs(server_in)) / jnp.maximum(jnp.sum(mine), 1)
  server_sign = jnp.where(server_in >= 0, 1.0, -1.0)
  new_server_error = jnp.where(mine, server_in - server_scale * server_sign, 0.0)
  server_packed = compress.pack_codes((server_in >= 0).astype(jnp.uint8), 1)

  # "invarying": the gathered values are the same on every replica, and typed so (out_specs P()).
  all_packed = jax.lax.all_gather(server_packed, axis, to="invarying")  # [n, chunk / 8]
  all_scales = jax.lax.all_gather(server_scale, axis, to="invarying")  # [n]
  all_bits = jax.vmap(lambda b: compress.unpack_codes(b, 1))(all_packed).astype(F32)
  result = (all_scales[:, None] * (2.0 * all_bits - 1.0)).reshape(-1)[:size].reshape(x.shape)
  sent = lp // 8 + 4 + chunk // 8 + 4
  return result, new_worker_error.reshape(x.shape), new_server_error, sent


def on_island_rows(fn: Any, *leaves: jax.Array) -> tuple[jax.Array, ...]:
  """fn(*rows) -> tuple of 1-D arrays, on each island device's row of `outer.island_flat(leaf)`
  (a nested shard_map manual over the island's axes: a row never spans devices). Returns the
  outputs stacked [d, ...]."""
  flats = [outer.island_flat(x) for x in leaves]
  local = lambda *fs: tuple(o[None] for o in fn(*(f[0] for f in fs)))
  axes = outer.island_axes()
  if not axes:
    return local(*flats)
  # check_vma=False: as outer.compressed_mean's map (the gathers over `replica` inside it).
  return jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(), axis_names=frozenset(axes),
                       in_specs=P(axes), out_specs=P(axes), check_vma=False)(*flats)


def island_allreduce(x: jax.Array, worker_error: jax.Array, server_error: jax.Array, *,
                     axis: str) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`compressed_allreduce` of each island device's row of x. All arrays like x (float32; the
  server error kept in place, see the module's State). Returns (average, worker_error, server_error)."""
  n, d = jax.lax.axis_size(axis), outer.island_size()
  k = -(-x.size // d)
  lp = padded_size(k, n)
  chunk = lp // n

  axes = outer.island_axes()

  def row(x_row, we_row, se_row):
    start = jax.lax.axis_index(axis) * chunk
    se_mine = jax.lax.dynamic_slice_in_dim(jnp.pad(se_row, (0, lp - k)), start, chunk)
    real = x.size - (jax.lax.axis_index(axes) * k if axes else 0)  # the last rows end in padding
    avg, we, se, _ = compressed_allreduce(x_row, we_row, se_mine, axis=axis, valid=jnp.clip(real, 0, k))
    se_full = jax.lax.dynamic_update_slice_in_dim(jnp.zeros((lp,), F32), se, start, 0)[:k]
    return avg, we, se_full

  avg, we, se = on_island_rows(row, x.astype(F32), worker_error, server_error)
  return (outer.from_island_flat(avg, worker_error), outer.from_island_flat(we, worker_error),
          outer.from_island_flat(se, server_error))


def island_allreduce_bytes(size: int, replicas: int, island: int) -> int:
  """Bytes one replica's island sends in `island_allreduce` of a leaf of `size` values."""
  lp = padded_size(-(-size // island), replicas)
  return island * (lp // 8 + 4 + lp // (8 * replicas) + 4)


@dataclasses.dataclass(frozen=True)
class OneBitAdam(AdamWRule):
  """1-bit Adam's update rule (AdamW's keyword fields from `AdamWRule`). `replicas`: the size of
  `axis` (it sizes the server chunks)."""

  freeze_step: int
  replicas: int

  def __post_init__(self):
    if self.freeze_step < 1:
      raise ValueError(f"1-bit Adam: freeze_step={self.freeze_step} must be >= 1 (the frozen variance "
                       "comes from the full-precision warm-up)")

  @classmethod
  def from_config(cls, optimizer_cfg: Any, lowcomm_cfg: Any, replicas: int, decay_mask: Any = None) -> OneBitAdam:
    """From the `optimizer` and `lowcomm` config sections (b1, b2, eps, weight_decay, grad_clip;
    freeze_step) and mesh.replica."""
    return cls(freeze_step=lowcomm_cfg.freeze_step, replicas=replicas, decay_mask=decay_mask,
               **cls.adamw_fields(optimizer_cfg))

  def init(self, params: Any) -> OneBitAdamState:
    """One replica's initial state (zeros)."""
    zeros = lambda p: jnp.zeros(p.shape, F32)
    return OneBitAdamState(m=jax.tree.map(zeros, params), v=jax.tree.map(zeros, params),
                           worker_error=jax.tree.map(zeros, params), server_error=jax.tree.map(zeros, params))

  def update(self, grads_local: Any, state: OneBitAdamState, params: Any, *, axis: str, step: Any,
             lr: Any) -> tuple[Any, OneBitAdamState, jax.Array]:
    """One step from this replica's gradients. step: 0-based count of updates done (traced or not);
    lr: this step's learning rate. Returns (params, state, bytes sent by this replica: float32)."""
    if jax.lax.axis_size(axis) != self.replicas:
      raise ValueError(f"1-bit Adam: built for replicas={self.replicas}, called over {axis!r} of size "
                       f"{jax.lax.axis_size(axis)}")
    t = jnp.asarray(step, jnp.int32) + 1
    mask = self.mask(params)
    b1, b2 = self.b1, self.b2

    def warm(state):
      grads, _ = outer.replica_mean(grads_local, axis)
      new_params, m, v = self.adamw(grads, state.m, state.v, params, t=t, lr=lr)
      return match_vma((new_params, dataclasses.replace(state, m=m, v=v)), (params, state), axis)

    def compressed(state):
      grads = clip_by_global_norm(jax.tree.map(lambda g: g.astype(F32), grads_local), self.grad_clip)
      local_m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.m, grads)
      out = jax.tree.map(lambda x, we, se: island_allreduce(x, we, se, axis=axis),
                         local_m, state.worker_error, state.server_error)
      is_out = lambda x: isinstance(x, tuple)
      m = jax.tree.map(lambda o: o[0], out, is_leaf=is_out)
      tf, frozen = t.astype(F32), jnp.float32(self.freeze_step)
      new_params = adamw_step(params, jax.tree.map(lambda x: x / (1 - b1**tf), m),
                              jax.tree.map(lambda x: x / (1 - b2**frozen), state.v), mask,
                              lr=lr, eps=self.eps, weight_decay=self.weight_decay)
      new_state = dataclasses.replace(state, m=m, worker_error=jax.tree.map(lambda o: o[1], out, is_leaf=is_out),
                                      server_error=jax.tree.map(lambda o: o[2], out, is_leaf=is_out))
      return match_vma((new_params, new_state), (params, state), axis)

    new_params, new_state = jax.lax.cond(t <= self.freeze_step, warm, compressed, state)
    warm_bytes = outer.padded_bytes(grads_local)
    compressed_bytes = sum(island_allreduce_bytes(p.size, self.replicas, outer.island_size())
                           for p in jax.tree.leaves(params))
    sent = jnp.where(t <= self.freeze_step, jnp.float32(warm_bytes), jnp.float32(compressed_bytes))
    return new_params, new_state, sent
