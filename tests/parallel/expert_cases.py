"""Inputs and the per-token reference shared by the expert dispatch tests.

The reference never sorts, slots or communicates: for each token t and each of its chosen experts
e (picked in numpy from the float32 router logits, ties to the lower index), it adds
kept[t, k] * weight * SwiGLU_e(x_t), with the weight recomputed from the router's softmax of the
chosen experts and `kept` from GShard's priority order, counted in a numpy loop per dispatch group.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def make_inputs(t=16, d=8, f=8, e=8, seed=0, ties=True):
  """x [T, D], router [D, E], w_gate/w_up [E, D, F], w_down [E, F, D], float32."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(t, d)).astype(np.float32)
  router = rng.normal(size=(d, e)).astype(np.float32)
  if ties:
    router[:, 3] = router[:, 1]  # experts 1 and 3 always score the same
  w_gate, w_up = (rng.normal(size=(e, d, f)).astype(np.float32) / np.sqrt(d) for _ in range(2))
  w_down = rng.normal(size=(e, f, d)).astype(np.float32) / np.sqrt(f)
  return x, router, w_gate, w_up, w_down


def logits(x, router):
  return jnp.dot(x, router, precision="highest")


def choose(x, router, top_k, empty_expert=None):
  """Chosen experts [T, K] in numpy, ties to the lower expert index; `empty_expert` never chosen."""
  lg = np.asarray(jax.jit(logits)(x, router), np.float32)
  if empty_expert is not None:
    lg = lg.copy()
    lg[:, empty_expert] = -np.inf
  return np.stack([sorted(range(lg.shape[1]), key=lambda j: (-lg[i, j], j))[:top_k] for i in range(lg.shape[0])])


def choose_skewed(x, router, top_k, favourite=0, empty_expert=None):
  """Chosen experts [T, K] when a selection bias puts `favourite` first for every token (the
  others as `choose` orders them)."""
  ranked = choose(x, router, top_k + 1, empty_expert)
  return np.stack([[favourite] + [j for j in row if j != favourite][:top_k - 1] for row in ranked])


def gshard_kept(chosen, n_experts, capacity_factor, groups):
  """[T, K] bool: pairs that fit their expert's capacity, per contiguous group of tokens."""
  t, k = chosen.shape
  kept = np.zeros((t, k), bool)
  size = t // groups
  cap = max(1, math.ceil(capacity_factor * size * k / n_experts))
  for g in range(groups):
    used = np.zeros(n_experts, int)
    for j in range(k):
      for i in range(g * size, (g + 1) * size):
        if used[chosen[i, j]] < cap:
          kept[i, j] = True
          used[chosen[i, j]] += 1
  return kept


def reference(chosen, kept):
  """The per-pair reference as a function of (x, router, w_gate, w_up, w_down). The chosen weights
  are renormalised to sum to 1 with top-k > 1; top-1 keeps the raw probability (Switch)."""
  chosen, kept = jnp.asarray(chosen), jnp.asarray(kept, jnp.float32)

  def ref(x, router, w_gate, w_up, w_down):
    probs = jax.nn.softmax(logits(x, router), axis=-1)
    w = jnp.take_along_axis(probs, chosen, axis=-1)
    w = (w / w.sum(-1, keepdims=True) if chosen.shape[1] > 1 else w) * kept
    hp = "highest"
    gate = jnp.einsum("td,tkdf->tkf", x, w_gate[chosen], precision=hp)
    up = jnp.einsum("td,tkdf->tkf", x, w_up[chosen], precision=hp)
    out = jnp.einsum("tkf,tkfd->tkd", jax.nn.silu(gate) * up, w_down[chosen], precision=hp)
    return jnp.einsum("tk,tkd->td", w, out, precision=hp)

  return ref


def loop_reference(x, router, w_gate, w_up, w_down, chosen, kept):
  """The same sum as `reference`, token by token in float64 numpy (checks the reference)."""
  x, router, w_gate, w_up, w_down = (np.asarray(a, np.float64) for a in (x, router, w_gate, w_up, w_down))
  y = np.zeros_like(x)
  for t in range(x.shape[0]):
    lg = x[t] @ router
    p = np.exp(lg - lg.max())
    p /= p.sum()
    total = sum(p[e] for e in chosen[t]) if len(chosen[t]) > 1 else 1.0
    for j, e in enumerate(chosen[t]):
      if kept[t, j]:
        g, u = x[t] @ w_gate[e], x[t] @ w_up[e]
        y[t] += p[e] / total * ((g / (1 + np.exp(-g)) * u) @ w_down[e])
  return y
