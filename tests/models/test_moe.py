"""The MoE layer against a per-token reference written here (forward, gradients, statistics), the
interleaving of dense and MoE blocks against a layer-by-layer loop, and active-parameter FLOPs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import ModelConfig, get_config
from models.moe import MoE, is_sparse, layer_slots, stack_layout
from models.transformer import Transformer, flops_per_token
from parallel.plan import single_device_plan
from tests.reference import rel_err

BASE = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24, max_seq_len=16,
                   n_experts=6, experts_top_k=2, expert_d_ff=12, init_std=0.3)
ROUTERS = {
    "softmax_top2_shared_gate": dict(n_shared_experts=1, shared_expert_gate=True),
    # DeepSeek-V3: sigmoid scores, 4 groups of 2, a token's best 2 groups, top-3 renormalised and
    # scaled, a bias that changes the picks, two shared experts of their own width.
    "sigmoid_groups_bias_scale": dict(n_experts=8, experts_top_k=3, router_score="sigmoid", router_groups=4,
                                      router_topk_groups=2, routed_scale=2.5, n_shared_experts=2,
                                      shared_expert_d_ff=8),
    "softmax_top1_unnormalised": dict(experts_top_k=1, router_topk_norm=False),
}


def _np_select(probs_TxE: np.ndarray, bias_E: np.ndarray, cfg: ModelConfig) -> np.ndarray:
  """Each token's chosen experts, best first, ties to the lower index (a loop over tokens)."""
  e, k = cfg.n_experts, cfg.experts_top_k
  out = []
  for scores in probs_TxE + bias_E:
    allowed = np.ones(e, bool)
    if cfg.router_groups > 1:
      size = e // cfg.router_groups
      group_scores = [np.sort(scores[g * size:(g + 1) * size])[::-1][:2].sum() for g in range(cfg.router_groups)]
      best = sorted(range(cfg.router_groups), key=lambda g: (-group_scores[g], g))[:cfg.router_topk_groups]
      allowed = np.repeat(np.isin(np.arange(cfg.router_groups), best), size)
    ranked = sorted((i for i in range(e) if allowed[i]), key=lambda i: (-scores[i], i))
    out.append(ranked[:k])
  return np.asarray(out)


def _swiglu(x, w_gate, w_up, w_down):
  return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


def _reference(params: dict, x_BxLxD: jax.Array, chosen_TxK: np.ndarray, cfg: ModelConfig) -> jax.Array:
  """y of every token by a loop over tokens and their chosen experts (differentiable in params and x)."""
  x = x_BxLxD.reshape(-1, cfg.d_model)
  logits = x @ params["router"]
  probs = jax.nn.softmax(logits, -1) if cfg.router_score == "softmax" else jax.nn.sigmoid(logits)
  rows = []
  for t in range(x.shape[0]):
    w = probs[t, chosen_TxK[t]]
    if cfg.router_topk_norm:
      w = w / jnp.sum(w)
    y = sum(w[j] * cfg.routed_scale * _swiglu(x[t], params["w_gate"][e], params["w_up"][e], params["w_down"][e])
            for j, e in enumerate(chosen_TxK[t]))
    if cfg.n_shared_experts:
      s = params["shared"]
      shared = _swiglu(x[t], s["w_gate"], s["w_up"], s["w_down"])
      if cfg.shared_expert_gate:
        shared = jax.nn.sigmoid(x[t] @ params["shared_gate"]) * shared
      y = y + shared
    rows.append(y)
  return jnp.stack(rows).reshape(x_BxLxD.shape)


@pytest.fixture(scope="module", params=list(ROUTERS))
def case(request):
  cfg = dataclasses.replace(BASE, **ROUTERS[request.param])
  layer = MoE(cfg, rngs=nnx.Rngs(1))
  graphdef, state = nnx.split(layer)
  variables = nnx.to_pure_dict(state)
  rng = np.random.default_rng(2)
  if request.param == "sigmoid_groups_bias_scale":
    variables["router_bias"] = jnp.asarray(rng.normal(0, 0.3, cfg.n_experts), jnp.float32)
  x = jnp.asarray(rng.normal(size=(2, 5, cfg.d_model)), jnp.float32)
  ct = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  return cfg, graphdef, variables, x, ct


def _model_fn(graphdef):
  return lambda variables, x: nnx.merge(graphdef, variables)(x, single_device_plan())


def test_moe_layer_matches_per_token_reference(case):
  cfg, graphdef, variables, x, ct = case
  with jax.default_matmul_precision("highest"):
    logits = np.asarray(x.reshape(-1, cfg.d_model) @ variables["router"], np.float64)
    probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True) if cfg.router_score == "softmax"
             else 1 / (1 + np.exp(-logits)))
    chosen = _np_select(probs, np.asarray(variables["router_bias"], np.float64), cfg)
    if cfg.router_score == "sigmoid":  # the bias really moves some picks
      assert not np.array_equal(chosen, _np_select(probs, np.zeros(cfg.n_experts), cfg))
    params = {k: v for k, v in variables.items() if k != "router_bias"}

    def loss(params, x, fn):
      return jnp.sum(fn(params, x) * ct)

    got_fn = lambda p, x: _model_fn(graphdef)({**p, "router_bias": variables["router_bias"]}, x)[0]
    want_fn = lambda p, x: _reference(p, x, chosen, cfg)
    (got, outputs), want = jax.jit(_model_fn(graphdef))(variables, x), jax.jit(want_fn)(params, x)
    assert rel_err(got, want) < 1e-5
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    got_g, want_g = grad(params, x, got_fn), grad(params, x, want_fn)
  for path, g in jax.tree_util.tree_leaves_with_path(got_g):
    w = want_g
    for key in path:
      w = w[getattr(key, "key", getattr(key, "idx", None))]
    assert rel_err(g, w) < 1e-5, jax.tree_util.keystr(path)
  # Statistics: the load counts every pick (dropless drops none); the Switch loss from its formula.
  load = np.bincount(chosen.reshape(-1), minlength=cfg.n_experts)
  np.testing.assert_array_equal(outputs["tokens_per_expert"], load)
  assert float(outputs["dropped"]) == 0.0
  switch = cfg.n_experts * np.sum(load / chosen.size * probs.mean(0))
  np.testing.assert_allclose(float(outputs["aux_loss"]), switch, rtol=1e-5)
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(float(outputs["z_loss"]), np.mean(lse ** 2), rtol=1e-5)


@pytest.mark.parametrize("n_layers,first_dense,every", [(8, 0, 1), (7, 2, 2), (9, 1, 3), (5, 4, 1), (6, 0, 4)])
def test_stack_layout_follows_the_sparse_layer_rule(n_layers, first_dense, every):
  cfg = dataclasses.replace(BASE, n_layers=n_layers, moe_first_dense=first_dense, moe_every=every)
  want = ["M" if i >= first_dense and (i + 1) % every == 0 else "D" for i in range(n_layers)]
  assert [("M" if is_sparse(cfg, i) else "D") for i in range(n_layers)] == want
  a, groups, per, suffix = stack_layout(cfg)
  assert ["D"] * a + (["D"] * (per - 1) + ["M"]) * groups + ["D"] * suffix == want
  assert [s for s, _ in layer_slots(cfg)] == ["moe_layers" if k == "M" else "layers" for k in want]


# Dense prefix, groups of (dense, MoE) and a dense suffix; and an all-MoE hybrid-attention stack.
STACKS = {"prefix_groups_suffix": dict(n_layers=5, moe_first_dense=2, moe_every=2),
          "all_moe_hybrid": dict(n_layers=2, layer_pattern="LS", linear_chunk=4)}


@pytest.mark.parametrize("name", list(STACKS))
def test_mixed_stack_matches_layer_by_layer_loop(name):
  cfg = dataclasses.replace(BASE, init_std=0.1, **STACKS[name])
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  plan = single_device_plan()
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 8)), jnp.int32)
  kinds = [k == "L" for k in cfg.layer_pattern * (cfg.n_layers // len(cfg.layer_pattern))]

  def loop(model, tokens):
    carry = model.embed_tokens(tokens, plan=plan)
    fns = {s: model.layer_fn(plan, s) for s in ("layers", "moe_layers") if hasattr(model, s)}
    outs = []
    for i, (stack, j) in enumerate(layer_slots(cfg)):
      fn, stacked = fns[stack]
      inputs = jnp.int32(kinds[i]) if len(set(kinds)) > 1 else None
      carry, out = fn(jax.tree.map(lambda a: a[j], stacked), carry, inputs)
      if out:
        outs.append(out)
    return model.head(carry["x"], plan=plan), jax.tree.map(lambda *a: jnp.stack(a), *outs)

  def scanned(model, tokens):
    carry, outs = model.forward_layers(model.embed_tokens(tokens, plan=plan), plan=plan)
    return model.head(carry["x"], plan=plan), outs

  graphdef, state = nnx.split(model)
  run = lambda f: jax.jit(lambda s, t: f(nnx.merge(graphdef, s), t))(state, tokens)
  with jax.default_matmul_precision("highest"):
    (want, want_out), (got, got_out) = run(loop), run(scanned)
  n_moe = sum(is_sparse(cfg, i) for i in range(cfg.n_layers))
  assert got_out["tokens_per_expert"].shape == (n_moe, cfg.n_experts)
  assert rel_err(got, want) < 1e-5
  for key in want_out:
    np.testing.assert_allclose(got_out[key], want_out[key], rtol=1e-5, atol=1e-6)


def test_flops_count_active_parameters():
  """The `moe` preset: ~2.8B parameters, ~1B active; FLOPs from the active ones by hand."""
  cfg = get_config("moe").model
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  d, hd = cfg.d_model, cfg.resolved_head_dim
  attention = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 2 * d  # q, o, k, v and two norms
  routed = 3 * d * cfg.expert_d_ff
  shared = 3 * d * cfg.n_shared_experts * cfg.shared_expert_d_ff
  layer_total = attention + cfg.n_experts * routed + shared + d * cfg.n_experts
  layer_active = attention + cfg.experts_top_k * routed + shared + d * cfg.n_experts
  head = cfg.vocab_size * d + d  # output projection and final norm (the input embedding is a lookup)
  assert n_params == cfg.n_layers * layer_total + head + cfg.vocab_size * d
  assert 2.5e9 < n_params < 3e9 and 0.9e9 < cfg.n_layers * layer_active + head < 1.2e9
  want = 6 * (cfg.n_layers * layer_active + head) + 6 * cfg.n_layers * d * 4096
  assert flops_per_token(cfg, n_params, 4096) == pytest.approx(want, rel=1e-12)


def test_forced_balance_gives_every_expert_the_same_tokens():
  """`model.router_force_balance` (benchmarks): token t's k-th expert is (t K + k) mod E."""
  cfg = dataclasses.replace(BASE, router_force_balance=True)
  graphdef, state = nnx.split(MoE(cfg, rngs=nnx.Rngs(1)))
  variables = nnx.to_pure_dict(state)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 6, cfg.d_model)), jnp.float32)
  with jax.default_matmul_precision("highest"):
    y, outputs = jax.jit(_model_fn(graphdef))(variables, x)
    chosen = (np.arange(12)[:, None] * 2 + np.arange(2)) % cfg.n_experts
    want = _reference({k: v for k, v in variables.items() if k != "router_bias"}, x, chosen, cfg)
  np.testing.assert_array_equal(outputs["tokens_per_expert"], np.full(cfg.n_experts, 4.0))
  assert rel_err(y, want) < 1e-5
