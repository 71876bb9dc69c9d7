"""Hugging Face Llama interop: logits parity with transformers both ways, exact round trips, errors."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from configs import ModelConfig
from models.hf_llama import (config_from_hf, config_to_hf, export_model, load_hf_checkpoint, model_from_hf,
                             params_from_hf, params_to_hf, save_hf_checkpoint)
from models.transformer import Transformer

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=64)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
HF_CONFIGS = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5),
    "mha_tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "mqa_head_dim": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32, rope_theta=500000.0),
    "llama3_scaling": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rope_scaling=LLAMA3),
    "llama3_scaling_tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                rope_theta=500000.0, rope_scaling=LLAMA3),
}
TOKENS = np.random.default_rng(0).integers(0, 128, (2, 24))  # 24 > original_max_position_embeddings


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def hf_model(seed: int, **kw) -> transformers.LlamaForCausalLM:
  """A float32 HF Llama with random weights large enough that attention and norms matter."""
  torch.manual_seed(seed)
  kw = {k: dict(v) if isinstance(v, dict) else v for k, v in kw.items()}  # transformers edits rope dicts in place
  config = transformers.LlamaConfig(**SMALL, **kw, attn_implementation="eager")
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.1 * torch.randn_like(p))
  return model


def hf_logits(model) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.numpy()


def our_logits(model: Transformer) -> np.ndarray:
  return np.asarray(model(jnp.asarray(TOKENS)))


def model_with(cfg: ModelConfig, params: dict) -> Transformer:
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_import_matches_transformers(tmp_path, name):
  hf = hf_model(0, **HF_CONFIGS[name])
  hf.save_pretrained(tmp_path)
  model = model_from_hf(tmp_path)
  assert model.cfg.tie_embeddings == hf.config.tie_word_embeddings
  assert model.cfg.resolved_head_dim == hf.config.head_dim
  assert rel_err(our_logits(model), hf_logits(hf)) <= 1e-4


def test_rope_scaling_matters_at_this_length(tmp_path):
  """Guards the llama3 parity test: without scaling the logits must differ clearly."""
  hf_model(0, **HF_CONFIGS["llama3_scaling"]).save_pretrained(tmp_path)
  cfg, params = load_hf_checkpoint(tmp_path)
  assert cfg.rope_scaling_factor == 8.0 and cfg.rope_original_max_len == 16
  scaled = our_logits(model_with(cfg, params))
  unscaled = our_logits(model_with(dataclasses.replace(cfg, rope_scaling_factor=1.0), params))
  assert rel_err(unscaled, scaled) > 1e-2


def test_sharded_checkpoint(tmp_path):
  hf = hf_model(1, **HF_CONFIGS["gqa"])
  hf.save_pretrained(tmp_path / "one")
  hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  _, one = load_hf_checkpoint(tmp_path / "one")
  _, sharded = load_hf_checkpoint(tmp_path / "sharded")
  jax.tree.map(np.testing.assert_array_equal, sharded, one)


def test_bf16_checkpoint(tmp_path):
  hf = hf_model(2, **HF_CONFIGS["llama3_scaling"])
  expected = hf_logits(hf)
  hf.save_pretrained(tmp_path / "f32")
  hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  cfg, params = load_hf_checkpoint(tmp_path / "bf16")
  _, params_f32 = load_hf_checkpoint(tmp_path / "f32")
  rounded = jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float32), params_f32)
  jax.tree.map(np.testing.assert_array_equal, params, rounded)  # exactly the bf16 values, as float32
  assert all(a.dtype == np.float32 for a in jax.tree.leaves(params))
  assert rel_err(our_logits(model_with(cfg, params)), expected) <= 2e-2


def random_model(cfg: ModelConfig, seed: int) -> Transformer:
  """Our own init, with the norm scales perturbed so that they are tested too."""
  model = Transformer(cfg, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(seed)
  params = nnx.to_pure_dict(state)
  for norm in (params["final_norm"], params["layers"]["attn_norm"], params["layers"]["mlp_norm"]):
    norm["scale"] = jnp.asarray(1 + 0.1 * rng.standard_normal(norm["scale"].shape), jnp.float32)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


OUR_CONFIGS = {
    "gqa": ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                       max_seq_len=64, init_std=0.1),
    "mqa_tied_llama3": ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=32,
                                   d_ff=96, max_seq_len=64, rope_theta=500000.0, rope_scaling_factor=8.0,
                                   rope_original_max_len=16, norm_eps=1e-6, tie_embeddings=True, init_std=0.1),
}


@pytest.mark.parametrize("name", sorted(OUR_CONFIGS))
def test_export_matches_transformers(tmp_path, name):
  cfg = OUR_CONFIGS[name]
  model = random_model(cfg, seed=3)
  export_model(model, tmp_path)
  hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.float32)
  assert hf.config.tie_word_embeddings == cfg.tie_embeddings
  assert hf.config.rope_parameters["rope_theta"] == cfg.rope_theta
  assert hf.config.rope_parameters["rope_type"] == ("llama3" if cfg.rope_scaling_factor != 1.0 else "default")
  assert rel_err(hf_logits(hf), our_logits(model)) <= 1e-4
  exported = config_from_hf(json.loads((tmp_path / "config.json").read_text()))
  assert exported == dataclasses.replace(cfg, init_std=ModelConfig.init_std)


@pytest.mark.parametrize("name", sorted(OUR_CONFIGS))
def test_round_trip_is_exact(name):
  cfg = OUR_CONFIGS[name]
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.split(random_model(cfg, seed=4))[1]))
  back = params_from_hf(params_to_hf(params, cfg), cfg)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  assert config_from_hf(config_to_hf(cfg)) == dataclasses.replace(cfg, init_std=ModelConfig.init_std)


def test_save_bf16_round_trip(tmp_path):
  cfg = OUR_CONFIGS["gqa"]
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.split(random_model(cfg, seed=5))[1]))
  save_hf_checkpoint(tmp_path, cfg, params, dtype="bfloat16")
  assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
  _, back = load_hf_checkpoint(tmp_path)
  jax.tree.map(lambda b, p: np.testing.assert_array_equal(b, p.astype(ml_dtypes.bfloat16).astype(np.float32)),
               back, params)


def test_legacy_and_new_rope_layouts_agree():
  base = dict(SMALL, num_attention_heads=4, num_key_value_heads=2)
  legacy_scaling = {"type" if k == "rope_type" else k: v for k, v in LLAMA3.items()}  # 4.x used "type"
  old = dict(base, rope_theta=500000.0, rope_scaling=legacy_scaling)
  new = dict(base, rope_parameters={**LLAMA3, "rope_theta": 500000.0})
  assert config_from_hf(old) == config_from_hf(new)
  assert config_from_hf(new).rope_theta == 500000.0 and config_from_hf(new).rope_scaling_factor == 8.0
  assert config_from_hf(dict(base, rope_theta=2.0)).rope_theta == 2.0  # old layout without scaling


@pytest.fixture
def hf_tensors():
  cfg = OUR_CONFIGS["gqa"]
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.split(random_model(cfg, seed=6))[1]))
  return cfg, params, params_to_hf(params, cfg)


def test_missing_tensor_raises(hf_tensors):
  cfg, _, tensors = hf_tensors
  del tensors["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(ValueError, match=r"missing .*model\.layers\.1\.mlp\.up_proj\.weight"):
    params_from_hf(tensors, cfg)


def test_unexpected_tensor_raises(hf_tensors):
  cfg, _, tensors = hf_tensors
  tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
  with pytest.raises(ValueError, match=r"unexpected .*model\.layers\.0\.self_attn\.q_proj\.bias"):
    params_from_hf(tensors, cfg)


def test_wrong_shape_raises(hf_tensors):
  cfg, params, tensors = hf_tensors
  tensors["model.layers.1.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
  with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight: shape \(64, 64\)"):
    params_from_hf(tensors, cfg)
  params["layers"]["attn"]["wq"] = params["layers"]["attn"]["wq"].transpose(0, 1, 3, 2)  # [L, D, hd, H]
  with pytest.raises(ValueError, match=r"layers\.attn\.wq: shape \(2, 64, 16, 4\), expected \(2, 64, 4, 16\)"):
    params_to_hf(params, cfg)


def test_tied_checkpoint_with_lm_head_copy(hf_tensors):
  cfg, _, tensors = hf_tensors
  cfg = dataclasses.replace(cfg, tie_embeddings=True)
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
  assert "lm_head" not in params_from_hf(tensors, cfg)
  tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1
  with pytest.raises(ValueError, match="lm_head.weight"):
    params_from_hf(tensors, cfg)


@pytest.mark.parametrize("field, value, pattern", [
    ("attention_bias", True, "attention_bias=True"),
    ("mlp_bias", True, "mlp_bias=True"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}, "rope_type='yarn'"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_type='linear'"),
    ("model_type", "mistral", "model_type='mistral'"),
])
def test_unsupported_config_raises(field, value, pattern):
  hf = dict(SMALL, num_attention_heads=4, **{field: value})
  with pytest.raises(ValueError, match=pattern):
    config_from_hf(hf)


def test_missing_config_field_raises():
  hf = dict(SMALL, num_attention_heads=4)
  del hf["intermediate_size"]
  with pytest.raises(ValueError, match="intermediate_size"):
    config_from_hf(hf)


# Qwen2 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm): the same dense interop, attention options on.
QWEN_CONFIGS = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(num_attention_heads=4, num_key_value_heads=2, rope_parameters={"rope_type": "default",
                                                                                  "rope_theta": 1e6})),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(num_attention_heads=4, num_key_value_heads=1, head_dim=24, tie_word_embeddings=True)),
}


def hf_qwen(name: str, seed: int):
  config_cls, model_cls, kw = QWEN_CONFIGS[name]
  torch.manual_seed(seed)
  model = model_cls(config_cls(**SMALL, **kw, attn_implementation="eager")).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.1 * torch.randn_like(p))
  return model


@pytest.mark.parametrize("name", sorted(QWEN_CONFIGS))
def test_qwen_import_export_match_transformers(tmp_path, name):
  hf = hf_qwen(name, seed=7)
  hf.save_pretrained(tmp_path / "hf")
  model = model_from_hf(tmp_path / "hf")
  assert (model.cfg.qkv_bias, model.cfg.qk_norm) == (name == "qwen2", name == "qwen3")
  expected = hf_logits(hf)
  assert rel_err(our_logits(model), expected) <= 1e-4
  # Without the option's tensors the logits differ clearly: the parity above is not vacuous.
  params = nnx.to_pure_dict(nnx.split(model)[1])
  attn = params["layers"]["attn"]
  for key in ("bq", "bk", "bv") if name == "qwen2" else ("q_norm", "k_norm"):
    attn[key] = jnp.zeros_like(attn[key]) if name == "qwen2" else jnp.ones_like(attn[key])
  assert rel_err(our_logits(model_with(model.cfg, params)), expected) > 1e-2
  export_model(model, tmp_path / "ours")
  back = type(hf).from_pretrained(tmp_path / "ours", attn_implementation="eager", dtype=torch.float32)
  assert rel_err(hf_logits(back), expected) <= 1e-4
  cfg, again = load_hf_checkpoint(tmp_path / "ours")
  assert cfg == model.cfg
  jax.tree.map(np.testing.assert_array_equal, again, jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.split(model)[1])))


@pytest.mark.parametrize("field, value, pattern", [
    ("use_sliding_window", True, "use_sliding_window=True"),
    ("layer_types", ["full_attention", "sliding_attention"], "layer_types="),
])
def test_qwen_sliding_window_raises(field, value, pattern):
  hf = dict(SMALL, num_attention_heads=4, model_type="qwen2", **{field: value})
  with pytest.raises(ValueError, match=pattern):
    config_from_hf(hf)


def test_qwen3_attention_bias_raises():
  with pytest.raises(ValueError, match="attention_bias=True .* o_proj"):
    config_from_hf(dict(SMALL, num_attention_heads=4, model_type="qwen3", attention_bias=True))
  cfg = dataclasses.replace(OUR_CONFIGS["gqa"], qkv_bias=True, qk_norm=True)
  with pytest.raises(ValueError, match="qkv_bias=True with model.qk_norm=True"):
    config_to_hf(cfg)


def test_qwen_attention_options_split_over_heads():
  """q/k/v biases split with their heads over `tensor`, q/k norm scales replicated: the logits of
  one device."""
  from parallel.mesh import make_mesh
  from parallel.plan import make_plan
  cfg = dataclasses.replace(OUR_CONFIGS["gqa"], qkv_bias=True)
  plan = make_plan(make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4]))
  for cfg in (cfg, dataclasses.replace(cfg, qkv_bias=False, qk_norm=True)):
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(8)))
    rng = np.random.default_rng(8)
    state = jax.tree.map(lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(a.dtype), state)
    run = lambda p: jax.jit(lambda s, t: nnx.merge(graphdef, s)(t, plan=p))(state, jnp.asarray(TOKENS))
    assert rel_err(run(plan), our_logits(nnx.merge(graphdef, state))) <= 1e-5
