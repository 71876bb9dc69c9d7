"""The optimizer step against AdamW written out in numpy: global-norm clipping, Adam's moments and
bias correction, decoupled weight decay on weight matrices only (never on norm scales), and the
learning rate of the warmup + cosine schedule, the logged one being the one the update used.

Run under ZeRO-1 (moments and masters updated in slices over `fsdp`) with clipping active.
"""

import math

import jax
import numpy as np
import optax
import pytest

import configs
from tests.reference import assert_close
from tests.training.common import MODEL, packed_batch
from training.grad import make_grad_fn
from training.state import init_state, setup_from_config
from training.step import make_train_step

PEAK, MIN_RATIO, WARMUP, TOTAL = 1e-2, 0.1, 2, 6
B1, B2, EPS, WD, CLIP = 0.9, 0.95, 1e-8, 0.1, 0.05
OPT = [f"optimizer.learning_rate={PEAK}", f"optimizer.min_lr_ratio={MIN_RATIO}", f"optimizer.warmup_steps={WARMUP}",
       f"train.steps={TOTAL}", f"optimizer.b1={B1}", f"optimizer.b2={B2}", f"optimizer.eps={EPS}",
       f"optimizer.weight_decay={WD}", f"optimizer.grad_clip={CLIP}"]
ZERO1 = ["mesh.data=2", "mesh.fsdp=4", "sharding.zero_stage=1"]


def hand_lr(t: int) -> float:
  """Linear warmup from 0 over WARMUP steps, then cosine from PEAK to PEAK * MIN_RATIO at TOTAL."""
  if t < WARMUP:
    return PEAK * t / WARMUP
  frac = min(t - WARMUP, TOTAL - WARMUP) / (TOTAL - WARMUP)
  end = PEAK * MIN_RATIO
  return end + (PEAK - end) * 0.5 * (1 + math.cos(math.pi * frac))


def decayed(path) -> bool:
  """Weight decay applies to every weight but the RMSNorm scales (named `scale`)."""
  return getattr(path[-1], "key", None) != "scale"


def numpy_adamw(params, grads, mu, nu, count: int, lr: float):
  """One clipped AdamW update in float64: returns (new params, new mu, new nu)."""
  to64 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float64), t)
  params, grads, mu, nu = map(to64, (params, grads, mu, nu))
  norm = math.sqrt(sum(float((g ** 2).sum()) for g in jax.tree.leaves(grads)))
  scale = CLIP / norm if norm > CLIP else 1.0
  grads = jax.tree.map(lambda g: g * scale, grads)
  mu = jax.tree.map(lambda m, g: B1 * m + (1 - B1) * g, mu, grads)
  nu = jax.tree.map(lambda v, g: B2 * v + (1 - B2) * g * g, nu, grads)
  c = count + 1

  def update(path, p, m, v):
    u = (m / (1 - B1 ** c)) / (np.sqrt(v / (1 - B2 ** c)) + EPS)
    if decayed(path):
      u = u + WD * p
    return p - lr * u

  return jax.tree_util.tree_map_with_path(update, params, mu, nu), mu, nu


@pytest.fixture(scope="module")
def setup():
  return setup_from_config(configs.get_config("tiny", MODEL + ZERO1 + OPT))


def test_schedule_is_warmup_then_cosine(setup):
  from training.optimizer import learning_rate_schedule
  schedule = learning_rate_schedule(setup.config.optimizer, TOTAL)
  np.testing.assert_allclose([float(schedule(t)) for t in range(TOTAL + 2)], [hand_lr(t) for t in range(TOTAL + 2)],
                             rtol=1e-6, atol=1e-12)


def test_steps_match_numpy_adamw(setup):
  state = init_state(setup)
  step, grad_fn = make_train_step(setup), jax.jit(make_grad_fn(setup))
  rng = np.random.default_rng(0)
  params = jax.device_get(state["params"])
  mu = nu = jax.tree.map(np.zeros_like, params)
  for t in range(4):
    batch = jax.device_put(packed_batch(rng, setup.config.model.vocab_size, keep=0.8), setup.batch_sharding)
    grads = jax.device_get(grad_fn(state["params"], batch)[0])
    state, metrics = step(state, batch)
    # The rate logged for step t is the schedule's at t, and the one the update applied.
    assert float(metrics["lr"]) == pytest.approx(hand_lr(t), rel=1e-6)
    np.testing.assert_allclose(float(metrics["grad_norm"]),
                               math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in jax.tree.leaves(grads))),
                               rtol=1e-5)
    want, mu, nu = numpy_adamw(params, grads, mu, nu, t, float(metrics["lr"]))
    new = jax.device_get(state["params"])
    if t == 0:
      assert_close(optax.tree_utils.tree_get(state["opt_state"], "mu"), mu, what="Adam's first moment")
      # The schedule starts at 0: the first update changes nothing.
      jax.tree.map(np.testing.assert_array_equal, new, params)
    else:
      # The change of every parameter; norm scales move only by Adam, matrices also decay.
      assert_close(jax.tree.map(np.subtract, new, params), jax.tree.map(np.subtract, want, params),
                   what=f"step {t} update")
    params = new
  assert_close(optax.tree_utils.tree_get(state["opt_state"], "nu"), nu, what="Adam's second moment")
