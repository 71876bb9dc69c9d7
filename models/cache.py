"""The KV cache of a decoder, as a functional argument: arrays in, arrays out, no module state.

`KVCache` holds every layer's keys and values for `slots` sequences, stacked on `layers` so the
layer stack (`models.stack.scan_layers`) hands each layer its own slice as its layer input:

  k, v      [layers, slots, kv_heads, max_len, head_dim]  (the compute dtype)
  lengths   int32 [slots]: how many positions of each slot hold keys and values

A forward pass over new tokens ([B, T] rows, each written into one slot at consecutive positions)
reads each layer's cache slice, attends over it and over the new tokens (`attend_with_cache`), and
returns the new tokens' keys and values as the layer's outputs ([layers, B, T, K, D] after the
scan). `KVCache.write` scatters them in afterwards: one scatter per forward pass that XLA does in
place when the cache is donated, instead of a copy of a layer's cache slice per layer.

Each kv head's positions are contiguous ([..., max_len, head_dim] minor), so attention over the
cache is a batched matrix product over (slot, kv head) that reads the cache in place: with
positions before heads, the heads axis sits between the batch and matrix axes and XLA first copies
(transposes) every layer's cache slice at every step.

Sharding (logical axes, `CACHE_AXES`): slots over the batch axes (`data`, `fsdp`), kv heads over
`tensor` (as the k/v projections are column-parallel), so a tensor-parallel decoder keeps each
device's heads' cache local and attention needs no communication.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.layers import einsum_f32

CACHE_AXES = ("layers", "batch", "kv_heads", None, "head_dim")


def replicated(host: np.ndarray, like: Any = None) -> jax.Array:
  """`host` on the device, replicated over the mesh of `like` (a NamedSharding; None: the default
  device). A cache's small arrays (lengths, page tables) are placed so, as the compiled calls that
  update the cache return them: the first call compiles the program the later ones run."""
  if like is None:
    return jax.device_put(host)
  return jax.device_put(host, jax.sharding.NamedSharding(like.mesh, jax.sharding.PartitionSpec()))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys, values and lengths of `slots` sequences; see the module docstring for shapes."""

  k: jax.Array
  v: jax.Array
  lengths: jax.Array

  @classmethod
  def zeros(cls, n_layers: int, slots: int, max_len: int, kv_heads: int, head_dim: int, dtype: Any,
            sharding: Any = None) -> KVCache:
    """An empty cache; `sharding` (a NamedSharding for k and v) lays it out on a mesh, with the
    lengths replicated over it (`replicated`)."""
    shape = (n_layers, slots, kv_heads, max_len, head_dim)
    make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return cls(make(), make(), replicated(np.zeros((slots,), np.int32), sharding))

  @property
  def max_len(self) -> int:
    return self.k.shape[3]

  @property
  def slots(self) -> int:
    return self.k.shape[1]

  def window(self, span: int) -> KVCache:
    """A copy of positions [0, span) of every slot: a cache of max_len `span` with the same lengths.
    A decode loop whose every sequence stays below `span` reads and writes this window instead of
    the cache (a slice of the positions axis is not contiguous, so XLA copies it: once per loop, not
    once per step), then hands the loop's tokens back (`write_back`)."""
    if not 0 < span <= self.max_len:
      raise ValueError(f"span={span} must be in [1, max_len={self.max_len}]")
    return KVCache(self.k[:, :, :, :span], self.v[:, :, :, :span], self.lengths)

  def rows(self, slot_ids_B: jax.Array | None) -> dict:
    """The per-layer inputs of the layer stack for rows that write into `slot_ids_B` (None: the
    rows are the slots, in order): {"k", "v": [layers, B, K, max_len, D]}. Slot ids >= slots
    (padding rows) read the last slot; their writes are dropped by `write`."""
    k, v = self.k, self.v
    if slot_ids_B is None:
      return {"k": k, "v": v}
    return {"k": jnp.take(k, slot_ids_B, axis=1, mode="clip"), "v": jnp.take(v, slot_ids_B, axis=1, mode="clip")}

  def write(self, new_kv: dict, slot_ids_B: jax.Array | None, positions_BxT: jax.Array,
            new_lengths_B: jax.Array) -> KVCache:
    """Scatters the new tokens' keys and values ([layers, B, T, K, D]) to their slots and positions.

    Positions >= max_len are dropped (padding of a bucketed chunk, inactive slots), so a caller
    marks a token it does not want written with position `max_len`; a row whose slot id is >= slots
    (a padding row) writes nothing, its length included.
    """
    slots = jnp.arange(self.slots) if slot_ids_B is None else slot_ids_B
    # The two index arrays are apart (kv heads between them), so the indexed view is [B, T, layers,
    # K, D] (NumPy's rule for separated advanced indices): the updates are laid out to match.
    idx = (slice(None), jnp.broadcast_to(slots[:, None], positions_BxT.shape), slice(None), positions_BxT)
    to_view = lambda a: a.transpose(1, 2, 0, 3, 4).astype(self.k.dtype)
    k = self.k.at[idx].set(to_view(new_kv["k"]), mode="drop")
    v = self.v.at[idx].set(to_view(new_kv["v"]), mode="drop")
    return KVCache(k, v, self.lengths.at[slots].set(new_lengths_B.astype(jnp.int32), mode="drop"))


def write_back(cache: Any, window: KVCache, starts_S: jax.Array, active_S: jax.Array, steps: int) -> Any:
  """`cache` (a `KVCache` or a `models.paged_cache.PagedKVCache`) with the positions [start, start +
  steps) of every active slot copied from `window` (`KVCache.window`), and the window's lengths: a
  decode loop that wrote `steps` tokens into the window alone hands them to the cache in one gather
  and one scatter, not one scatter per step."""
  positions = starts_S[:, None] + jnp.arange(steps, dtype=starts_S.dtype)[None]  # [S, steps]
  read = jnp.minimum(positions, window.max_len - 1)[None, :, None, :, None]
  take = lambda a: jnp.take_along_axis(a, read, axis=3).transpose(0, 1, 3, 2, 4)  # [L, S, steps, K, D]
  write = jnp.where(active_S[:, None], positions, cache.max_len)
  return cache.write({"k": take(window.k), "v": take(window.v)}, None, write, window.lengths)


def attend_with_cache(q_BxTxHxD: jax.Array, k_BxTxKxD: jax.Array, v_BxTxKxD: jax.Array, cache_k_BxKxSxD: jax.Array,
                      cache_v_BxKxSxD: jax.Array, cache_len_B: jax.Array) -> jax.Array:
  """Causal GQA attention of T new tokens over a row's cached positions [0, cache_len) and the new
  tokens themselves (token t sees new tokens 0..t). One softmax over both parts in float32; the
  cache is read once, in its own layout (batched over slot and kv head), and never concatenated
  with the new keys. Returns [B, T, H, D].

  Padding after a row's last real token is harmless: real tokens never see later ones.
  """
  b, t, h, d = q_BxTxHxD.shape
  kv = k_BxTxKxD.shape[2]
  if h % kv:
    raise ValueError(f"{h} query heads do not group over {kv} key/value heads")
  q = q_BxTxHxD.reshape(b, t, kv, h // kv, d)
  scale = d ** -0.5
  f32 = jnp.float32
  s_cache = einsum_f32("btkgd,bksd->bkgts", q, cache_k_BxKxSxD.astype(q.dtype)) * scale
  s_new = jnp.einsum("btkgd,bukd->bkgtu", q, k_BxTxKxD, preferred_element_type=f32) * scale
  cached = jnp.arange(cache_k_BxKxSxD.shape[2])[None, :] < cache_len_B[:, None]  # [B, S]
  causal = jnp.tril(jnp.ones((t, t), bool))
  neg = jnp.finfo(jnp.float32).min
  s_cache = jnp.where(cached[:, None, None, None, :], s_cache, neg)
  s_new = jnp.where(causal, s_new, neg)
  # One softmax over both parts, without concatenating them (XLA:GPU fuses a concatenation of the
  # scores with the small new-token products into one slow kernel per layer).
  top = jax.lax.stop_gradient(jnp.maximum(s_cache.max(-1, keepdims=True), s_new.max(-1, keepdims=True)))
  e_cache, e_new = jnp.exp(s_cache - top), jnp.exp(s_new - top)
  total = e_cache.sum(-1, keepdims=True) + e_new.sum(-1, keepdims=True)
  p_cache, p_new = (e_cache / total).astype(q.dtype), (e_new / total).astype(q.dtype)
  from_cache = einsum_f32("bkgts,bksd->btkgd", p_cache, cache_v_BxKxSxD.astype(q.dtype))
  out = from_cache + jnp.einsum("bkgtu,bukd->btkgd", p_new, v_BxTxKxD, preferred_element_type=f32)
  return out.reshape(b, t, h, d).astype(q.dtype)
