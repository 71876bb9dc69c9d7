"""The resident decode-chain kernel (bench/persistent_chain.py) on CPUs in the Pallas interpreter,
against the chain written in numpy (float32, each product and norm rounded to bfloat16 where the
model rounds). One program: the interpreter runs programs one after another, so a grid barrier
between two of them would never open. Many programs run only on a GPU (bench/decode_kernels.py
--persistent), where the kernel does not yet run correctly (BENCHMARKS.md)."""

import ml_dtypes
import numpy as np
import jax.numpy as jnp
import pytest

from bench import persistent_chain as pc

BF16 = ml_dtypes.bfloat16


def _round(a):
  return np.asarray(a, np.float32).astype(BF16).astype(np.float32)


def _numpy_chain(x, g, wq, wo, wgu, wd, eps=1e-6):
  norm = lambda v: _round(v / np.sqrt(np.mean(v * v, axis=1, keepdims=True) + eps) * g)
  dot = lambda v, w: _round(v @ w.T)
  for i in range(wq.shape[0]):
    y = dot(norm(x), wq[i])
    h = _round(x + dot(y[:, :x.shape[1]], wo[i]))
    n = norm(h)
    gate, up = dot(n, wgu[i, :, 0]), dot(n, wgu[i, :, 1])
    a = _round(gate / (1 + np.exp(-gate)) * up)
    x = _round(h + dot(a, wd[i]))
  return x


def test_chain_matches_numpy_in_the_interpreter():
  rng = np.random.default_rng(0)
  layers, rows, d, q, f = 2, 2, 32, 64, 48
  normal = lambda *s: _round(0.15 * rng.standard_normal(s))
  x, g = normal(rows, d) * 10, 1 + normal(d)
  ws = normal(layers, q, d), normal(layers, d, d), normal(layers, f, 2, d), normal(layers, d, f)
  got, count = pc.chain(*(jnp.asarray(a, jnp.bfloat16) for a in (x, g, *ws)), programs=1, block_n=8, block_k=16,
                        interpret=True, return_count=True)
  want = _numpy_chain(x, g, *ws)
  assert int(count) == 4 * layers  # every barrier's atomic add ran (an unused one is pruned away)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


def test_chain_refuses_shapes_that_do_not_split():
  z = lambda *s: jnp.zeros(s, jnp.bfloat16)
  with pytest.raises(ValueError, match="F=48 does not split"):
    pc.chain(z(2, 32), z(32), z(1, 64, 32), z(1, 32, 32), z(1, 48, 2, 32), z(1, 32, 48), programs=4, block_n=8)
  with pytest.raises(ValueError, match="wo must be"):
    pc.chain(z(2, 32), z(32), z(1, 64, 32), z(1, 32, 16), z(1, 48, 2, 32), z(1, 32, 48), programs=1)
