"""Streaming DiLoCo (Douillard et al. 2025, "Streaming DiLoCo with overlapping communication:
Towards a Distributed Free Lunch"): DiLoCo whose parameters are synchronised in fragments on
staggered schedules, each fragment's averaged outer update applied tau inner steps after its
exchange started and mixed with the island's newer local values, the exchange quantised.

Fragments: the layer stack's layers are dealt to `fragments` fragments (layer l to fragment
l mod P, the paper's strided pattern); the other parameters (embedding: fragment 0; final norm
and output layer: the last fragment) join those. Fragment p starts its sync before inner step s
when s > 0 and s = (p + 1) H / P (mod H), so one fragment syncs every H / P steps.

Sync of fragment p, issued before inner step s (inside a `jax.shard_map` manual over `axis`):
  Delta_p = outer_p - local_p, quantised to `quant_bits` per island-device row (0: float32),
  all-gathered over `axis` and averaged (a float32 psum when unquantised), then the outer
  Nesterov step updates outer_p. The inner step s runs in the same compiled program and does not
  depend on the exchange, so the two overlap. Before inner step s + tau it lands:
  local_p <- mix local_p + (1 - mix) outer_p   (mix = alpha; 0 replaces, as DiLoCo does).
Bytes per replica per sync: the fragment's payload (`compress.payload_bytes`, padded per row).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from parallel.lowcomm import outer
from parallel.lowcomm.compress import dequantize, quantize


def fragment_of(params: Any, p: int, n: int) -> dict:
  """Fragment p of n of a parameter tree {"layers": stacked [n_layers, ...], others...}."""
  out = {"layers": jax.tree.map(lambda x: x[p::n], params["layers"])}
  owner = lambda key: 0 if key == "embed" else n - 1
  out.update({k: v for k, v in params.items() if k != "layers" and owner(k) == p})
  return out


def with_fragment(params: Any, frag: dict, p: int, n: int) -> Any:
  """`params` with fragment p of n replaced by `frag` (as `fragment_of` returns it)."""
  new = dict(params)
  new["layers"] = jax.tree.map(lambda x, f: x.at[p::n].set(f.astype(x.dtype)), params["layers"], frag["layers"])
  for key, value in frag.items():
    if key != "layers":
      new[key] = value
  return new


def exchange_mean(delta: Any, axis: str, bits: int) -> tuple[Any, int]:
  """Replica mean of `delta`: `bits`-bit quantised and all-gathered, or a float32 psum (bits=0)."""
  if bits == 0:
    return outer.replica_mean(delta, axis)
  mean, _, sent = outer.compressed_mean(delta, axis, lambda row: quantize(row, bits), dequantize)
  return mean, sent


class StreamingDiLoCo:
  """Outer state (per replica, identical on all): `params` (outer parameters) and `momentum`."""

  needs_layers = True

  def __init__(self, cfg, n_layers: int):
    self.cfg, self.n = cfg, cfg.fragments
    h = cfg.inner_steps
    self.offsets = [((p + 1) * h // self.n) % h for p in range(self.n)]

  def init(self, params: Any) -> dict:
    return {"params": params, "momentum": outer.zeros_like_f32(params)}

  def _starting(self, s: int) -> tuple[int, ...]:
    h = self.cfg.inner_steps
    return tuple(p for p in range(self.n) if s > 0 and s % h == self.offsets[p])

  def events(self, step: int) -> tuple:
    tau = self.cfg.delay
    return (self._starting(step), self._starting(step - tau) if step - tau > 0 else ())

  def before(self, events, params, state, *, axis):
    start, land = events
    c, sent = self.cfg, 0
    outer_params, momentum = state["params"], state["momentum"]
    for p in start:
      g, l, m = (fragment_of(t, p, self.n) for t in (outer_params, params, momentum))
      delta, b = exchange_mean(outer.pseudo_gradient(g, l), axis, c.quant_bits)
      g, m = outer.nesterov_step(g, delta, m, lr=c.outer_lr, mu=c.outer_momentum, nesterov=c.outer_nesterov)
      outer_params = with_fragment(outer_params, g, p, self.n)
      momentum = with_fragment(momentum, m, p, self.n)
      sent += b
    for p in land:
      g, l = fragment_of(outer_params, p, self.n), fragment_of(params, p, self.n)
      f32 = lambda x: x.astype(jnp.float32)
      mixed = jax.tree.map(lambda a, b: (c.mix * f32(a) + (1 - c.mix) * f32(b)).astype(a.dtype), l, g)
      params = with_fragment(params, mixed, p, self.n)
    return params, {"params": outer_params, "momentum": momentum}, sent

  def after(self, events, params, state, *, axis):
    return params, state, 0
