"""Prefill/decode disaggregation: prompts are computed on one sub-mesh and decoded on another, and
a request's keys and values move between the two caches when its prompt is done (DistServe, Zhong
et al. 2024; Splitwise, Patel et al. 2024). The two phases then stop competing for the same
devices: a step's prompt chunks and its decode tokens run at the same time, each on its own half.

`KVTransfer.move` copies one slot's first `length` positions (rounded up to a power of two, so the
number of compilations stays logarithmic in max_len) from the prefill runner's cache to the same
slot of the decode runner's cache: a slice on the prefill devices, a `jax.device_put` onto the
decode devices' layout of it (the cross-sub-mesh copy), and an in-place update of the decode
cache (donated). Both runners hold contiguous caches of the same slots and max_len. Across
processes the prefill side is a worker (`serving.prefill_worker`) and the slice comes over TCP.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp

from models.cache import CACHE_AXES
from serving.runner import ModelRunner, span_bucket

ROW_AXES = CACHE_AXES[:1] + CACHE_AXES[2:]  # one slot's [layers, kv_heads, positions, head_dim]


class KVTransfer:
  """Moves prompts' keys and values from `prefill`'s cache to `decode`'s; counts bytes and time.
  `prefill` is a `ModelRunner` on other devices of this process, or a
  `serving.prefill_worker.RemotePrefill` (another process: its `take` sends the arrays over TCP)."""

  def __init__(self, prefill: Any, decode: ModelRunner):
    if (prefill.slots, prefill.max_len) != (decode.slots, decode.max_len):
      raise ValueError(f"prefill and decode caches differ: slots and max_len {(prefill.slots, prefill.max_len)} "
                       f"against {(decode.slots, decode.max_len)}")
    self.local = isinstance(prefill, ModelRunner)
    if self.local and set(prefill.plan.mesh.devices.flat) & set(decode.plan.mesh.devices.flat):
      raise ValueError("prefill and decode sub-meshes must not share devices")
    self.prefill, self.decode = prefill, decode
    self.count = self.bytes = 0
    self.seconds = 0.0
    self._put = jax.jit(_put, donate_argnums=(0,))

  def move(self, slot: int, length: int) -> None:
    """Slot `slot`'s positions [0, length) and its length, prefill cache -> decode cache; waits for
    the copy (the decode cache is idle between engine steps), so `seconds` is the transfer's time."""
    span = span_bucket(length, self.prefill.max_len)
    start = time.perf_counter()
    if self.local:
      k, v = take_slot(self.prefill.cache, slot, span=span)
    else:
      k, v = self.prefill.take(slot, span)
    dst = self.decode.plan
    layout = dst.sharding(ROW_AXES, dst.activations, k.shape)
    k, v = jax.device_put((k, v), layout)
    self.decode.cache = self._put(self.decode.cache, k, v, jnp.int32(slot), jnp.int32(length))
    jax.block_until_ready(self.decode.cache.k)
    self.seconds += time.perf_counter() - start
    self.count += 1
    self.bytes += 2 * k.size * k.dtype.itemsize


@functools.partial(jax.jit, static_argnames=("span",))
def take_slot(cache, slot, *, span: int):
  """Slot `slot`'s keys and values over positions [0, span): [layers, kv heads, span, head dim] each."""
  return cache.k[:, slot, :, :span], cache.v[:, slot, :, :span]


def _put(cache, k_LxKxSxD, v_LxKxSxD, slot, length):
  at = (0, slot, 0, 0, 0)
  return type(cache)(jax.lax.dynamic_update_slice(cache.k, k_LxKxSxD[:, None], at),
                     jax.lax.dynamic_update_slice(cache.v, v_LxKxSxD[:, None], at),
                     cache.lengths.at[slot].set(length))
