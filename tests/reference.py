"""The one check of an op against its dense reference: forward values and gradients, at the
tolerances every parallel op is held to (float32 at `precision=highest`: 1e-5 relative; bfloat16:
2e-2), measured as ||got - want|| / ||want|| over each output and each gradient.

The reference always runs in float32 on float32 copies of the inputs; the op runs on the inputs as
given, so a bfloat16 op is compared with exact float32 math.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

RTOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2e-2}


def rel_err(got: Any, want: Any) -> float:
  """||got - want|| / ||want|| in float64 (0 when both are 0)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  denom = np.linalg.norm(want)
  return float(np.linalg.norm(got - want) / denom) if denom else float(np.linalg.norm(got))


def tolerance(dtype: Any) -> float:
  return RTOL[jnp.dtype(dtype)]


def assert_close(got: Any, want: Any, dtype: Any = jnp.float32, what: str = "value") -> None:
  """Every leaf of `got` within the dtype's tolerance of the same leaf of `want`."""
  tol = tolerance(dtype)
  got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got_leaves) == len(want_leaves), f"{what}: {len(got_leaves)} leaves vs {len(want_leaves)}"
  for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
    assert np.shape(g) == np.shape(w), f"{what}[{i}]: shape {np.shape(g)} vs {np.shape(w)}"
    err = rel_err(g, w)
    assert err <= tol, f"{what}[{i}]: relative error {err:.3g} > {tol:g}"


def _float32(x: Any) -> Any:
  return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x


def check_against_reference(op: Callable, reference: Callable, args: Sequence[Any], *,
                            argnums: Sequence[int] | None = None, dtype: Any = jnp.float32,
                            seed: int = 0) -> None:
  """op(*args) against reference(*float32 args): outputs, and the gradients of a random linear
  function of the outputs with respect to `argnums` (default: every floating-point argument)."""
  args = tuple(args)
  if argnums is None:
    argnums = tuple(i for i, a in enumerate(args) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating))
  argnums = tuple(argnums)
  ref_args = tuple(_float32(jnp.asarray(a)) for a in args)

  out, want = jax.jit(op)(*args), jax.jit(reference)(*ref_args)
  assert_close(out, want, dtype, "output")

  leaves, treedef = jax.tree.flatten(want)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  cotangent = jax.tree.unflatten(treedef, [jax.random.normal(k, jnp.shape(l), jnp.float32)
                                           for k, l in zip(keys, leaves)])

  def projected(fn):
    def scalar(*a):
      return sum(jnp.vdot(o.astype(jnp.float32), c) for o, c in zip(jax.tree.leaves(fn(*a)), jax.tree.leaves(cotangent)))
    return jax.jit(jax.grad(scalar, argnums=argnums))

  assert_close(projected(op)(*args), projected(reference)(*ref_args), dtype, "gradient")
