"""The KV cache of a decoder, as a functional argument: arrays in, arrays out, no module state.

`KVCache` holds every layer's keys and values for `slots` sequences, stacked on `layers` so the
layer stack (`models.stack.scan_layers`) hands each layer its own slice as its layer input:

  k, v      [layers, slots, max_len, kv_heads, head_dim]  (the compute dtype)
  lengths   int32 [slots]: how many positions of each slot hold keys and values

A forward pass over new tokens ([B, T] rows, each written into one slot at consecutive positions)
reads each layer's cache slice, attends over it and over the new tokens (`attend_with_cache`), and
returns the new tokens' keys and values as the layer's outputs ([layers, B, T, K, D] after the
scan). `KVCache.write` scatters them in afterwards: one scatter per forward pass that XLA does in
place when the cache is donated, instead of a copy of a layer's cache slice per layer.

Sharding (logical axes, `CACHE_AXES`): slots over the batch axes (`data`, `fsdp`), kv heads over
`tensor` (as the k/v projections are column-parallel), so a tensor-parallel decoder keeps each
device's heads' cache local and attention needs no communication.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

CACHE_AXES = ("layers", "batch", None, "kv_heads", "head_dim")


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
    """An empty cache; `sharding` (a NamedSharding for k and v) lays it out on a mesh."""
    shape = (n_layers, slots, max_len, kv_heads, head_dim)
    make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return cls(make(), make(), jnp.zeros((slots,), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.k.shape[2]

  @property
  def slots(self) -> int:
    return self.k.shape[1]

  def rows(self, slot_ids_B: jax.Array | None, span: int | None = None) -> dict:
    """The per-layer inputs of the layer stack for rows that write into `slot_ids_B` (None: the
    rows are the slots, in order), positions [0, span) only (None: all of max_len):
    {"k", "v": [layers, B, span, K, D]}. A decode step reads only `span` positions per slot, so a
    caller that knows every row's length is below it reads no more of the cache than it needs.
    Slot ids >= slots (padding rows) read the last slot; their writes are dropped by `write`."""
    span = self.max_len if span is None else span
    if not 0 < span <= self.max_len:
      raise ValueError(f"span={span} must be in [1, max_len={self.max_len}]")
    k, v = self.k[:, :, :span], self.v[:, :, :span]
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
    idx = (slice(None), jnp.broadcast_to(slots[:, None], positions_BxT.shape), positions_BxT)
    k = self.k.at[idx].set(new_kv["k"].astype(self.k.dtype), mode="drop")
    v = self.v.at[idx].set(new_kv["v"].astype(self.v.dtype), mode="drop")
    return KVCache(k, v, self.lengths.at[slots].set(new_lengths_B.astype(jnp.int32), mode="drop"))


def attend_with_cache(q_BxTxHxD: jax.Array, k_BxTxKxD: jax.Array, v_BxTxKxD: jax.Array, cache_k_BxSxKxD: jax.Array,
                      cache_v_BxSxKxD: jax.Array, cache_len_B: jax.Array) -> jax.Array:
  """Causal GQA attention of T new tokens over a row's cached positions [0, cache_len) and the new
  tokens themselves (token t sees new tokens 0..t). One softmax over both parts in float32; the
  cache is read once and never concatenated with the new keys. Returns [B, T, H, D].

  Padding after a row's last real token is harmless: real tokens never see later ones.
  """
  b, t, h, d = q_BxTxHxD.shape
  kv = k_BxTxKxD.shape[2]
  if h % kv:
    raise ValueError(f"{h} query heads do not group over {kv} key/value heads")
  q = q_BxTxHxD.reshape(b, t, kv, h // kv, d)
  scale = d ** -0.5
  f32 = jnp.float32
  if t == 1:
    # Decode: the products summed in float32 (a reduction, not a dot), reading the cache once in
    # its own layout. As a dot the cache's kv-head axis sits between its batch and matrix axes,
    # so XLA first transposes (copies) the cache slice of every layer at every step: three passes
    # over the largest tensor of a batched decode step instead of one.
    prod = q[:, 0, None].astype(f32) * cache_k_BxSxKxD[:, :, :, None].astype(q.dtype).astype(f32)  # [B,S,K,G,D]
    s_cache = jnp.sum(prod, axis=-1).transpose(0, 2, 3, 1)[:, :, :, None] * scale  # [B, K, G, 1, S]
  else:
    s_cache = jnp.einsum("btkgd,bskd->bkgts", q, cache_k_BxSxKxD.astype(q.dtype), preferred_element_type=f32) * scale
  s_new = jnp.einsum("btkgd,bukd->bkgtu", q, k_BxTxKxD, preferred_element_type=f32) * scale
  cached = jnp.arange(cache_k_BxSxKxD.shape[1])[None, :] < cache_len_B[:, None]  # [B, S]
  causal = jnp.tril(jnp.ones((t, t), bool))
  neg = jnp.finfo(jnp.float32).min
  s_cache = jnp.where(cached[:, None, None, None, :], s_cache, neg)
  s_new = jnp.where(causal, s_new, neg)
  p = jax.nn.softmax(jnp.concatenate([s_cache, s_new], axis=-1), axis=-1)
  p_cache, p_new = p[..., :s_cache.shape[-1]].astype(q.dtype), p[..., s_cache.shape[-1]:].astype(q.dtype)
  if t == 1:
    p_s = p_cache[:, :, :, 0].transpose(0, 3, 1, 2)[..., None].astype(f32)  # [B, S, K, G, 1]
    from_cache = jnp.sum(p_s * cache_v_BxSxKxD[:, :, :, None].astype(q.dtype).astype(f32), axis=1)[:, None]
  else:
    from_cache = jnp.einsum("bkgts,bskd->btkgd", p_cache, cache_v_BxSxKxD.astype(q.dtype), preferred_element_type=f32)
  out = from_cache + jnp.einsum("bkgtu,bukd->btkgd", p_new, v_BxTxKxD, preferred_element_type=f32)
  return out.reshape(b, t, h, d).astype(q.dtype)
