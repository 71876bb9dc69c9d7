"""Hugging Face mixture-of-experts interop: Mixtral, Qwen2-MoE and Qwen3-MoE logits within 1e-4 of
transformers (float32, eager attention) both ways, exact round trips, one loader for every
architecture, and the configurations that cannot be represented refused by name.

Tiny configs of odd shapes (d_model 48, 6 experts of width 21, GQA, an explicit head_dim) with a
dense/sparse mix per family: Mixtral all sparse; Qwen2-MoE a dense first layer (`mlp_only_layers`);
Qwen3-MoE every second layer sparse (`decoder_sparse_step`), so all three stack layouts run. One
device, dropless dispatch (capacity dropping would differ from transformers' dropless loop).
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from configs import ModelConfig
from models import hf_moe
from models.hf_llama import model_with_params
from models.moe import layer_slots
from models.transformer import Transformer
from parallel.mesh import make_mesh
from parallel.plan import make_plan

COMMON = dict(vocab_size=96, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64,
              num_experts_per_tok=2, attn_implementation="eager", experts_implementation="eager")
ARCHS = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(num_key_value_heads=2, intermediate_size=21, num_local_experts=6, rms_norm_eps=1e-5)),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  dict(num_key_value_heads=2, intermediate_size=40, moe_intermediate_size=21, num_experts=6,
                       shared_expert_intermediate_size=27, norm_topk_prob=False, mlp_only_layers=[0])),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(num_key_value_heads=1, head_dim=16, intermediate_size=40, moe_intermediate_size=21,
                       num_experts=6, norm_topk_prob=True, decoder_sparse_step=2, tie_word_embeddings=True)),
}
# transformers' eager experts: a loop over experts and their tokens (its grouped_mm path needs widths
# that are multiples of 4 floats on CPU).
# Layer slots each family's config must give (which stack, which index): the dense/sparse mixes.
SLOTS = {"mixtral": ["moe_layers"] * 3, "qwen2_moe": ["layers", "moe_layers", "moe_layers"],
         "qwen3_moe": ["layers", "moe_layers", "layers"]}
TOKENS = np.random.default_rng(0).integers(0, 96, (2, 24))


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def hf_logits(model) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.numpy()


@jax.jit
def _forward(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens)


def our_logits(model: Transformer) -> np.ndarray:
  return np.asarray(_forward(*nnx.split(model), jnp.asarray(TOKENS)))


def pure_params(model: Transformer) -> dict:
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.split(model)[1]))


def random_hf(arch: str, seed: int):
  """A float32 transformers model with random weights large enough that routing, norms and
  attention all matter (norm scales around 1, matrices around 0.1)."""
  config_cls, model_cls, kw = ARCHS[arch]
  torch.manual_seed(seed)
  model = model_cls(config_cls(**COMMON, **kw)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module", params=sorted(ARCHS))
def imported(request, tmp_path_factory):
  """(arch, the transformers model, its logits, our model imported from its saved directory)."""
  arch = request.param
  hf = random_hf(arch, seed=sorted(ARCHS).index(arch))
  path = tmp_path_factory.mktemp(arch)
  hf.save_pretrained(path)
  return arch, hf, hf_logits(hf), hf_moe.model_from_hf(path)


def test_config_mapping(imported):
  arch, hf, _, model = imported
  cfg, c = model.cfg, hf.config
  assert [stack for stack, _ in layer_slots(cfg)] == SLOTS[arch]
  assert (cfg.n_experts, cfg.experts_top_k, cfg.expert_d_ff) == (6, 2, 21)
  assert cfg.router_topk_norm == (arch != "qwen2_moe")
  assert (cfg.n_shared_experts, cfg.shared_expert_d_ff, cfg.shared_expert_gate) == (
      (1, 27, True) if arch == "qwen2_moe" else (0, 0, False))
  assert (cfg.qkv_bias, cfg.qk_norm) == (arch == "qwen2_moe", arch == "qwen3_moe")
  assert cfg.resolved_head_dim == (16 if arch == "qwen3_moe" else 12) and cfg.n_kv_heads == c.num_key_value_heads
  assert cfg.tie_embeddings == c.tie_word_embeddings


def test_import_matches_transformers(imported):
  _, _, expected, model = imported
  assert rel_err(our_logits(model), expected) <= 1e-4


def test_routing_matters(imported):
  """Guards the parity test: other experts for each token (the router negated) change the logits."""
  _, _, expected, model = imported
  params = nnx.to_pure_dict(nnx.split(model)[1])
  params["moe_layers"]["mlp"]["router"] = -params["moe_layers"]["mlp"]["router"]
  assert rel_err(our_logits(model_with_params(model.cfg, params)), expected) > 1e-2


def test_export_matches_transformers(imported, tmp_path):
  """Parameters of ours (the imported ones, every one moved; zero router bias), exported and
  loaded by transformers."""
  arch, hf, _, imported_model = imported
  cfg = imported_model.cfg
  rng = np.random.default_rng(5)
  params = jax.tree.map(lambda a: a + 0.05 * rng.standard_normal(a.shape).astype(a.dtype), pure_params(imported_model))
  params["moe_layers"]["mlp"]["router_bias"] = np.zeros_like(params["moe_layers"]["mlp"]["router_bias"])
  model = model_with_params(cfg, params)
  hf_moe.export_model(model, tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [type(hf).__name__]
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager",
                                                           experts_implementation="eager", dtype=torch.float32)
  assert type(back) is type(hf)
  assert rel_err(hf_logits(back), our_logits(model)) <= 1e-4
  cfg_back, params_back = hf_moe.load_hf(tmp_path)
  assert cfg_back == cfg
  jax.tree.map(np.testing.assert_array_equal, params_back, pure_params(model))


def test_round_trip_is_exact(imported):
  _, _, _, model = imported
  params = pure_params(model)
  back = hf_moe.params_from_hf(hf_moe.params_to_hf(params, model.cfg), model.cfg)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  assert hf_moe.config_from_hf(hf_moe.config_to_hf(model.cfg)) == model.cfg


def test_load_hf_picks_every_architecture(tmp_path):
  """Dense families go through the same loader (a Qwen2 here: q/k/v biases on)."""
  config = transformers.Qwen2Config(vocab_size=96, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
  hf = transformers.Qwen2ForCausalLM(config).eval()
  hf.save_pretrained(tmp_path)
  cfg, params = hf_moe.load_hf(tmp_path)
  assert cfg.n_experts == 0 and cfg.qkv_bias and "moe_layers" not in params
  assert set(hf_moe.MODEL_TYPES) == {"llama", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe"}
  with pytest.raises(ValueError, match="model_type='deepseek_v3' is not supported"):
    hf_moe.config_from_hf({**json.loads((tmp_path / "config.json").read_text()), "model_type": "deepseek_v3"})


def hf_dict(arch: str, **changes) -> dict:
  config_cls, _, kw = ARCHS[arch]
  return {**config_cls(**COMMON, **kw).to_dict(), **changes}


@pytest.mark.parametrize("arch, changes, pattern", [
    ("qwen2_moe", dict(mlp_only_layers=[1]), r"mlp_only_layers=\[1\] with decoder_sparse_step=1"),
    ("qwen3_moe", dict(decoder_sparse_step=0), "decoder_sparse_step=0"),
    ("qwen2_moe", dict(shared_expert_intermediate_size=0), "shared_expert_intermediate_size=0"),
    ("mixtral", dict(sliding_window=16), "sliding_window=16"),
    ("qwen3_moe", dict(use_sliding_window=True), "use_sliding_window=True"),
    ("qwen3_moe", dict(attention_bias=True), "attention_bias=True"),
    ("mixtral", dict(hidden_act="gelu"), "hidden_act='gelu'"),
])
def test_unsupported_config_raises(arch, changes, pattern):
  with pytest.raises(ValueError, match=pattern):
    hf_moe.config_from_hf(hf_dict(arch, **changes))


BASE = ModelConfig(vocab_size=96, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=40, max_seq_len=64,
                   n_experts=6, expert_d_ff=21)


@pytest.mark.parametrize("changes, pattern", [
    (dict(router_score="sigmoid"), "model.router_score='sigmoid'"),
    (dict(routed_scale=2.5), "model.routed_scale=2.5"),
    (dict(router_groups=2, router_topk_groups=1), "model.router_groups=2"),
    (dict(n_shared_experts=1), "without model.shared_expert_gate"),
    (dict(shared_expert_gate=True), "without shared experts"),
    (dict(qkv_bias=True), "model.qkv_bias=True without shared experts"),
    (dict(router_topk_norm=False), "model.router_topk_norm=False"),
    (dict(moe_first_dense=1), "model.moe_first_dense=1, model.moe_every=1: Mixtral"),
])
def test_unrepresentable_export_raises(changes, pattern):
  with pytest.raises(ValueError, match=pattern):
    hf_moe.config_to_hf(dataclasses.replace(BASE, **changes))


@pytest.fixture(scope="module")
def mixtral_tensors():
  cfg = hf_moe.config_from_hf(hf_dict("mixtral"))
  params = pure_params(Transformer(cfg, rngs=nnx.Rngs(1)))
  return cfg, params, hf_moe.params_to_hf(params, cfg)


def test_router_bias_export_raises(mixtral_tensors):
  cfg, params, _ = mixtral_tensors
  bias = params["moe_layers"]["mlp"]["router_bias"].copy()
  bias[1, 4] = 0.5
  changed = {**params, "moe_layers": {**params["moe_layers"], "mlp": {**params["moe_layers"]["mlp"],
                                                                       "router_bias": bias}}}
  with pytest.raises(ValueError, match=r"moe_layers\.mlp\.router_bias: non-zero"):
    hf_moe.params_to_hf(changed, cfg)
  del changed["moe_layers"]["mlp"]["router_bias"]  # a train state's "params": the bias lives beside them
  with pytest.raises(ValueError, match=r"moe_layers\.mlp\.router_bias: missing"):
    hf_moe.params_to_hf(changed, cfg)


def test_missing_expert_and_wrong_shape_raise(mixtral_tensors):
  cfg, _, tensors = mixtral_tensors
  tensors = dict(tensors)
  name = "model.layers.2.block_sparse_moe.experts.5.w3.weight"
  shape = tensors.pop(name).shape
  with pytest.raises(ValueError, match=rf"missing 1 tensor\(s\): {name}"):
    hf_moe.params_from_hf(tensors, cfg)
  tensors[name] = np.zeros(shape[::-1], np.float32)
  with pytest.raises(ValueError, match=rf"{name}: shape \(48, 21\), expected \(21, 48\)"):
    hf_moe.params_from_hf(tensors, cfg)


def test_sharded_matches_one_device(imported):
  """The imported model under data x expert parallelism (its odd widths do not split over `tensor`;
  tests/models/test_hf_llama.py splits the attention options' tensors over heads) gives the
  one-device logits."""
  _, _, _, model = imported
  plan = make_plan(make_mesh({"data": 2, "expert": 2}, jax.devices()[:4]))
  graphdef, state = nnx.split(model)
  sharded = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t, plan=plan))(state, jnp.asarray(TOKENS))
  assert rel_err(sharded, our_logits(model)) <= 1e-5
