"""Pieces shared by the outer optimizers over `replica`: the pseudo-gradient, the Nesterov outer
step, spreading what crosses `replica` over an island's devices, and byte accounting.

All functions run inside a `jax.shard_map` that is manual over the replica axis only (see
`training/lowcomm.py`): there an array is one island's whole array, laid out over the island's
own mesh axes (`data`, `fsdp`, `tensor`, ...) by the partitioner, and a collective over `replica`
runs between the devices that hold the same shard in every island.

What crosses `replica` is first spread over the island's devices (`island_flat`): a pseudo-gradient
leaf of n values becomes [d, ceil(n / d)] split over all d devices of the island, so each device
sends 1/d of it over the slow link (not the whole leaf from every device that holds a copy of
it, as a replicated DDP weight would be). The island gathers the result back over its fast links.

Byte accounting (the whole family): the bytes a replica sends in one exchange are the sizes of its
operands of each collective over `replica`, summed over the island's devices: for a `psum` the
island's padded array, for an `all_gather` its payload. `tests/training/test_lowcomm.py` checks
this account against the collectives of the compiled program.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import P

from parallel.lowcomm.compress import gather_mean


def island_axes() -> tuple[str, ...]:
  """The context mesh's axes of size > 1 that are not manual: the axes inside an island."""
  mesh = jax.sharding.get_abstract_mesh()
  return tuple(a for a in mesh.axis_names if mesh.shape[a] > 1 and a not in mesh.manual_axes)


def island_size() -> int:
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[a] for a in island_axes())


def island_flat(x: jax.Array) -> jax.Array:
  """x (any shape) -> float32 [d, ceil(x.size / d)], zero-padded and split over the island's d devices."""
  d = island_size()
  n = x.size
  flat = jnp.pad(x.astype(jnp.float32).reshape(-1), (0, -n % d)).reshape(d, -1)
  axes = island_axes()
  return jax.lax.with_sharding_constraint(flat, P(axes or None)) if axes else flat


def from_island_flat(flat: jax.Array, like: jax.Array) -> jax.Array:
  """The inverse of `island_flat`: [d, k] -> like.shape and dtype (the padding dropped)."""
  return flat.reshape(-1)[:like.size].reshape(like.shape).astype(like.dtype)


def padded_bytes(tree: Any, itemsize: int = 4) -> int:
  """Bytes of `island_flat` of every leaf: what one replica's island sends in one psum of the tree."""
  d = island_size()
  return sum(-(-x.size // d) * d * itemsize for x in jax.tree.leaves(tree))


def pseudo_gradient(outer_params: Any, local_params: Any) -> Any:
  """Delta = outer - local (DiLoCo's outer gradient: the negative of the island's progress), float32."""
  return jax.tree.map(lambda g, l: g.astype(jnp.float32) - l.astype(jnp.float32), outer_params, local_params)


def replica_mean(tree: Any, axis: str) -> tuple[Any, int]:
  """The mean over `axis` of every leaf, as one float32 psum per leaf spread over the island.

  Returns (mean, bytes this replica sends)."""
  n = jax.lax.axis_size(axis)
  mean = jax.tree.map(lambda x: from_island_flat(jax.lax.psum(island_flat(x), axis) / n, x), tree)
  return mean, padded_bytes(tree)


def compressed_mean(tree: Any, axis: str, compress_row: Callable[[jax.Array], Any],
                    decompress_row: Callable[[Any], jax.Array]) -> tuple[Any, Any, int]:
  """The mean over `axis` of compressed leaves: each leaf spread over the island (`island_flat`),
  each device's row [k] compressed on its own (a nested `shard_map` manual over the island's axes,
  so a chunk never spans devices and each device sends only its row's payload), the payloads
  all-gathered over `axis` (`compress.gather_mean`: codes cannot be summed in flight) and averaged
  after decompression. Returns (mean, what this replica sent once decompressed, bytes sent)."""
  axes, d = island_axes(), island_size()

  def row(flat_row):
    payload = compress_row(flat_row)
    mean, n_bytes = gather_mean(payload, decompress_row, axis)
    return mean, decompress_row(payload), n_bytes

  def one(x):
    flat = island_flat(x)
    k_bytes = {}
    if axes:
      def local(f):
        mean, sent, k_bytes["row"] = row(f[0])
        return mean[None], sent[None]
      # check_vma=False, as the runner's map over `replica` (training/lowcomm.py) that this one nests
      # in: with the check on here, the payloads' types would name only the island's axes, and JAX
      # (from 0.12.1) rejects the all_gather over `replica` of a value not typed as varying over it.
      mean, sent = jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(), axis_names=frozenset(axes),
                                 in_specs=P(axes), out_specs=(P(axes), P(axes)), check_vma=False)(flat)
    else:
      mean, sent, k_bytes["row"] = row(flat[0])
      mean, sent = mean[None], sent[None]
    return (from_island_flat(mean, x), from_island_flat(sent, x)), d * k_bytes["row"]

  pairs, sent_bytes = map_with_bytes(one, tree)
  is_pair = lambda p: isinstance(p, tuple) and len(p) == 2 and hasattr(p[0], "shape")
  mean = jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair)
  sent = jax.tree.map(lambda p: p[1], pairs, is_leaf=is_pair)
  return mean, sent, sent_bytes


def nesterov_step(params: Any, delta: Any, momentum: Any, *, lr: float, mu: float,
                  nesterov: bool = True) -> tuple[Any, Any]:
  """The outer step of DiLoCo (Douillard et al. 2023): SGD on the pseudo-gradient `delta` with
  momentum `mu`, Nesterov's form as in PyTorch's SGD:

    m <- mu m + delta;  params <- params - lr (delta + mu m)   (nesterov)
                        params <- params - lr m                (otherwise)

  Returns (new params in their own dtype, new float32 momentum)."""
  new_m = jax.tree.map(lambda m, d: mu * m + d, momentum, delta)
  step = (jax.tree.map(lambda d, m: d + mu * m, delta, new_m) if nesterov else new_m)
  new_p = jax.tree.map(lambda p, s: (p.astype(jnp.float32) - lr * s).astype(p.dtype), params, step)
  return new_p, new_m


class PeriodicSync:
  """The runner's view (training/lowcomm.py) of an outer algorithm that syncs after inner step t
  when (t + 1) % inner_steps == 0, in `after`, from per-replica outer state `params` (the outer
  parameters, identical on all replicas) and one float32 buffer like them named `buffer` (DiLoCo's
  momentum, SparseLoCo's error feedback). A subclass gives `buffer` and
  `sync(outer_params, local_params, buffer, *, axis) -> (new outer params, new buffer, bytes sent)`;
  every island restarts from the new outer parameters."""

  buffer: str

  def __init__(self, cfg):
    self.cfg = cfg

  def init(self, params: Any) -> dict:
    return {"params": params, self.buffer: zeros_like_f32(params)}

  def events(self, step: int) -> tuple[str, ...]:
    return ("sync",) if (step + 1) % self.cfg.inner_steps == 0 else ()

  def before(self, events, params, state, *, axis):
    return params, state, 0

  def after(self, events, params, state, *, axis):
    if "sync" not in events:
      return params, state, 0
    new, buffer, sent = self.sync(state["params"], params, state[self.buffer], axis=axis)
    return new, {"params": new, self.buffer: buffer}, sent


def zeros_like_f32(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)


def map_with_bytes(fn: Callable[..., tuple[Any, int]], *trees: Any) -> tuple[Any, int]:
  """Applies fn(leaf, ...) -> (value, bytes) over trees; returns (tree of values, total bytes)."""
  leaves, treedef = jax.tree.flatten(trees[0])
  others = [treedef.flatten_up_to(t) for t in trees[1:]]
  outs, total = [], 0
  for args in zip(leaves, *others):
    value, b = fn(*args)
    outs.append(value)
    total += b
  return jax.tree.unflatten(treedef, outs), total
