"""Routing and the router losses against numpy: softmax and sigmoid top-k, renormalisation and
routed scale, the selection-only bias, group-limited routing, ties (lower expert index first),
top-1; the Switch and sequence-wise balance losses, the z-loss and the bias update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from parallel.experts import losses
from parallel.experts.routing import route
from parallel.mesh import make_mesh


def np_route(logits, top_k, score="softmax", bias=None, n_groups=1, topk_groups=1, normalize=True, scale=1.0):
  """Token by token, in float64."""
  logits = np.asarray(logits, np.float64)
  t, e = logits.shape
  if score == "softmax":
    z = np.exp(logits - logits.max(-1, keepdims=True))
    probs = z / z.sum(-1, keepdims=True)
  else:
    probs = 1 / (1 + np.exp(-logits))
  select = probs + (0 if bias is None else np.asarray(bias, np.float64))
  size = e // n_groups
  weights, experts = np.zeros((t, top_k)), np.zeros((t, top_k), np.int64)
  for i in range(t):
    candidates = list(range(e))
    if n_groups > 1:
      group_score = [sum(sorted(select[i, g * size:(g + 1) * size], reverse=True)[:min(2, size)])
                     for g in range(n_groups)]
      groups = sorted(range(n_groups), key=lambda g: (-group_score[g], g))[:topk_groups]
      candidates = [x for g in sorted(groups) for x in range(g * size, (g + 1) * size)]
    chosen = sorted(candidates, key=lambda x: (-select[i, x], x))[:top_k]
    w = probs[i, chosen]
    weights[i] = (w / w.sum() if normalize else w) * scale
    experts[i] = chosen
  return weights, experts, probs


CASES = {
    "softmax_top2": dict(top_k=2),
    "top1": dict(top_k=1),
    "softmax_unnormalised": dict(top_k=3, normalize=False),
    "sigmoid_scaled": dict(top_k=2, score="sigmoid", scale=2.5),
    "sigmoid_bias": dict(top_k=2, score="sigmoid", bias=True),
    "softmax_bias": dict(top_k=2, bias=True),
    "groups": dict(top_k=2, score="sigmoid", n_groups=4, topk_groups=2, bias=True),
    "groups_of_one": dict(top_k=2, n_groups=8, topk_groups=3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_route_against_numpy(name):
  kw = dict(CASES[name])
  rng = np.random.default_rng(len(name))
  logits = rng.normal(size=(24, 8)).astype(np.float32)
  logits[:6, 5] = logits[:6, 2]  # exact ties: the lower index wins
  logits[6:9] = 0.5  # every expert tied
  bias = rng.normal(size=8).astype(np.float32) * 0.3 if kw.pop("bias", False) else None
  got = route(jnp.asarray(logits), bias_E=None if bias is None else jnp.asarray(bias), **kw)
  want_w, want_e, want_p = np_route(logits, bias=bias, **kw)
  np.testing.assert_array_equal(np.asarray(got.experts), want_e)
  np.testing.assert_allclose(np.asarray(got.weights), want_w, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(got.probs), want_p, rtol=1e-5, atol=1e-7)
  assert got.weights.dtype == jnp.float32 and got.experts.dtype == jnp.int32


def test_bias_changes_selection_not_weights():
  logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0]])
  plain = route(logits, top_k=1, score="sigmoid", normalize=False)
  biased = route(logits, top_k=1, score="sigmoid", normalize=False, bias_E=jnp.asarray([0.0, 0.0, 0.0, 5.0]))
  assert int(plain.experts[0, 0]) == 0 and int(biased.experts[0, 0]) == 3
  np.testing.assert_allclose(float(biased.weights[0, 0]), 1 / (1 + np.exp(1.0)), rtol=1e-6)


def test_bf16_logits_route_in_float32():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(5, 6)), jnp.bfloat16)
  got = route(logits, top_k=2)
  want_w, want_e, _ = np_route(np.asarray(logits, np.float32), 2)
  assert got.weights.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got.experts), want_e)
  np.testing.assert_allclose(np.asarray(got.weights), want_w, rtol=1e-5)


@pytest.mark.parametrize("kw, match", [
    (dict(top_k=9), "top_k=9"), (dict(top_k=0), "top_k=0"), (dict(top_k=2, score="relu"), "score"),
    (dict(top_k=2, n_groups=3), "n_groups=3"), (dict(top_k=2, n_groups=4, topk_groups=5), "topk_groups=5"),
    (dict(top_k=5, n_groups=4, topk_groups=2), "top_k=5 exceeds"),
    (dict(top_k=2, bias_E=jnp.zeros(7)), "bias shape")])
def test_route_rejects(kw, match):
  with pytest.raises(ValueError, match=match):
    route(jnp.zeros((3, 8)), **kw)


def test_losses_against_numpy():
  rng = np.random.default_rng(1)
  b, l, e, k = 3, 10, 6, 2
  logits = rng.normal(size=(b, l, e)).astype(np.float32)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  experts = np.stack([rng.permutation(e)[:k] for _ in range(b * l)]).reshape(b, l, k)
  counts = np.bincount(experts.reshape(-1), minlength=e).astype(np.float64)
  np.testing.assert_array_equal(np.asarray(losses.expert_load(jnp.asarray(experts), e)), counts)
  switch = e * np.sum(counts / (b * l * k) * probs.reshape(-1, e).mean(0))
  got = losses.switch_aux_loss(jnp.asarray(probs.reshape(-1, e)), jnp.asarray(experts.reshape(-1, k)), e)
  np.testing.assert_allclose(float(got), switch, rtol=1e-5)
  per_seq = []
  for s in range(b):
    f = np.bincount(experts[s].reshape(-1), minlength=e) * e / (k * l)
    p = (probs[s] / probs[s].sum(-1, keepdims=True)).mean(0)
    per_seq.append(np.sum(f * p))
  got = losses.sequence_aux_loss(jnp.asarray(probs), jnp.asarray(experts), e)
  np.testing.assert_allclose(float(got), np.mean(per_seq), rtol=1e-5)
  lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  np.testing.assert_allclose(float(losses.z_loss(jnp.asarray(logits.reshape(-1, e)))), np.mean(lse ** 2), rtol=1e-5)


def test_losses_over_manual_batch_shards_are_the_whole_batchs():
  """Inside a shard_map manual over a batch axis, `axis_names` makes each loss that of all the rows
  (numpy over the whole batch), on every shard."""
  rng = np.random.default_rng(4)
  b, l, e, k = 4, 6, 5, 2
  logits = rng.normal(size=(b, l, e)).astype(np.float32)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  experts = np.stack([rng.permutation(e)[:k] for _ in range(b * l)]).reshape(b, l, k)
  counts = np.bincount(experts.reshape(-1), minlength=e)
  want_switch = e * np.sum(counts / (b * l * k) * probs.reshape(-1, e).mean(0))
  want_seq = np.mean([np.sum(np.bincount(experts[s].reshape(-1), minlength=e) * e / (k * l)
                             * (probs[s] / probs[s].sum(-1, keepdims=True)).mean(0)) for s in range(b)])
  want_z = np.mean(np.log(np.exp(logits.astype(np.float64)).sum(-1)) ** 2)
  mesh = make_mesh({"data": 4}, jax.devices()[:4])

  def per_shard(p, x, z):
    return jnp.stack([losses.switch_aux_loss(p.reshape(-1, e), x.reshape(-1, k), e, ("data",)),
                      losses.sequence_aux_loss(p, x, e, ("data",)), losses.z_loss(z.reshape(-1, e), ("data",))])[None]

  got = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=P("data"), out_specs=P("data")))(
      jnp.asarray(probs), jnp.asarray(experts), jnp.asarray(logits))
  np.testing.assert_allclose(np.asarray(got), np.tile([want_switch, want_seq, want_z], (4, 1)), rtol=1e-5)


def test_balanced_switch_loss_is_one():
  e, k = 4, 2
  experts = jnp.asarray([[0, 1], [2, 3]] * 4)
  assert float(losses.switch_aux_loss(jnp.full((8, e), 1 / e), experts, e)) == pytest.approx(1.0)


def test_update_bias():
  bias = jnp.asarray([0.0, 0.1, -0.2, 0.0])
  load = jnp.asarray([10.0, 2.0, 4.0, 4.0])  # mean 5
  np.testing.assert_allclose(np.asarray(losses.update_bias(bias, load, 0.01)), [-0.01, 0.11, -0.19, 0.01], rtol=1e-6)


def test_loss_gradients_reach_probs_only():
  probs = jax.nn.softmax(jnp.asarray(np.random.default_rng(2).normal(size=(8, 4)), jnp.float32))
  experts = jnp.asarray(np.random.default_rng(3).integers(0, 4, (8, 2)))
  g = jax.grad(lambda p: losses.switch_aux_loss(p, experts, 4))(probs)
  counts = np.bincount(np.asarray(experts).reshape(-1), minlength=4)
  np.testing.assert_allclose(np.asarray(g), np.tile(4 * counts / 16 / 8, (8, 1)), rtol=1e-6)

