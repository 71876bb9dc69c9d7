"""Hugging Face dense interop (Llama, Qwen2, Qwen3): `config.json` <-> `ModelConfig`, safetensors
<-> shardlab parameters. Mixture-of-experts architectures (and one loader for all) are in
`models.hf_moe`; the checked tensor mapping and safetensors I/O are in `models.hf_common`.

Shardlab's RoPE uses the Hugging Face rotate-half layout, so q/k projections need only reshapes and
transposes, never a head permutation. Hugging Face `nn.Linear` weights are [out, in]; ours are
[in, ...]. Per-layer tensors are stacked on a leading `layers` axis. Qwen2 differs from Llama by
q/k/v biases (`model.qkv_bias`), Qwen3 by per-head RMSNorm of queries and keys (`model.qk_norm`).
Reading needs neither torch nor transformers: safetensors are read as numpy, bfloat16 through
`ml_dtypes`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import ModelConfig
from models.hf_common import (Spec, Stack, params_from_specs, params_to_specs, read_checkpoint, required, same,
                              transpose, write_checkpoint)
from models.transformer import Transformer

_ROPE_TYPES = ("default", "llama3")
DENSE_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _check_full_attention(hf: Mapping[str, Any], model_type: str) -> None:
  """Sliding-window attention (Mistral-style, or Qwen's per-layer windows) is not representable."""
  if hf.get("use_sliding_window"):
    raise ValueError(f"use_sliding_window=True is not supported (model_type={model_type!r}; full attention only)")
  if any(t != "full_attention" for t in hf.get("layer_types") or ()):
    raise ValueError(f"layer_types={hf['layer_types']!r} is not supported (only 'full_attention' layers)")
  window, max_len = hf.get("sliding_window"), hf.get("max_position_embeddings")
  if model_type in ("llama", "mixtral") and window is not None and (max_len is None or window < max_len):
    raise ValueError(f"sliding_window={window!r} is not supported (model_type={model_type!r}; full attention only)")


def base_fields(hf: Mapping[str, Any], model_type: str) -> dict[str, Any]:
  """`ModelConfig` fields of the embedding, attention, norms and head shared by the Llama, Qwen2,
  Qwen3, Mixtral and Qwen-MoE families (everything but the MLP)."""
  if model_type in ("qwen3", "qwen3_moe", "llama", "mixtral"):
    # Their attention_bias (when present) puts a bias on o_proj too, which shardlab does not have.
    if hf.get("attention_bias"):
      raise ValueError(f"attention_bias={hf['attention_bias']!r} is not supported for model_type={model_type!r}"
                       " (a bias on o_proj; shardlab has q/k/v biases only)")
  if hf.get("mlp_bias"):
    raise ValueError(f"mlp_bias={hf['mlp_bias']!r} is not supported (shardlab MLPs have no biases)")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
  _check_full_attention(hf, model_type)
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in _ROPE_TYPES:
    raise ValueError(f"rope_type={rope_type!r} is not supported (choose one of {_ROPE_TYPES})")
  partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    raise ValueError(f"partial_rotary_factor={partial!r} is not supported (only 1.0)")
  d_model, n_heads = required(hf, "hidden_size"), required(hf, "num_attention_heads")
  head_dim = hf.get("head_dim") or d_model // n_heads
  max_len = required(hf, "max_position_embeddings")
  scaling = {}
  if rope_type == "llama3":
    scaling = dict(rope_scaling_factor=float(required(rope, "factor")),
                   rope_low_freq_factor=float(required(rope, "low_freq_factor")),
                   rope_high_freq_factor=float(required(rope, "high_freq_factor")),
                   rope_original_max_len=int(rope.get("original_max_position_embeddings") or max_len))
  qkv_bias = model_type == "qwen2" or (model_type == "qwen2_moe" and hf.get("qkv_bias", True))
  return dict(
      vocab_size=required(hf, "vocab_size"), d_model=d_model, n_layers=required(hf, "num_hidden_layers"),
      n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
      head_dim=0 if head_dim == d_model // n_heads else head_dim, max_seq_len=max_len,
      rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=bool(qkv_bias), qk_norm=model_type in ("qwen3", "qwen3_moe"), **scaling)


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> ModelConfig:
  """A `ModelConfig` from a Llama, Qwen2 or Qwen3 `config.json` dict (transformers 4.x
  `rope_theta`/`rope_scaling` or 5.x `rope_parameters` layout). `overrides` set non-architecture
  fields (param_dtype, remat...)."""
  hf = dict(hf_config)
  model_type = hf.get("model_type", "llama")
  if model_type not in DENSE_TYPES:
    raise ValueError(f"model_type={model_type!r} is not supported here (dense: {tuple(DENSE_TYPES)}; "
                     "mixtures of experts: models.hf_moe)")
  return ModelConfig(**base_fields(hf, model_type), d_ff=required(hf, "intermediate_size"), **overrides)


def dense_type(cfg: ModelConfig) -> str:
  """The HF family whose attention matches: Qwen3 (q/k norm), Qwen2 (q/k/v biases) or Llama."""
  if cfg.qkv_bias and cfg.qk_norm:
    raise ValueError("model.qkv_bias=True with model.qk_norm=True has no Hugging Face architecture "
                     "(Qwen3's attention_bias also puts a bias on o_proj)")
  return "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"


def base_to_hf(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
  """The `config.json` fields of everything but the MLP. RoPE is written in both layouts:
  `rope_theta`/`rope_scaling` (transformers 4.x and most other readers) and `rope_parameters`
  (transformers 5.x)."""
  scaling = None
  if cfg.rope_scaling_factor != 1.0:
    scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
               "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
               "original_max_position_embeddings": cfg.rope_original_max_len}
  rope_parameters = {**(scaling or {"rope_type": "default"}), "rope_theta": float(cfg.rope_theta)}
  return {
      "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.resolved_head_dim, "vocab_size": cfg.vocab_size,
      "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
      "rope_theta": float(cfg.rope_theta), "rope_scaling": scaling, "rope_parameters": rope_parameters,
      "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
      "use_sliding_window": False, "sliding_window": None, "torch_dtype": dtype, "dtype": dtype,
  }


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
  """A Llama, Qwen2 or Qwen3 `config.json` dict, by the attention options (see `dense_type`)."""
  if cfg.n_experts:
    raise ValueError(f"model.n_experts={cfg.n_experts}: a mixture of experts is exported by models.hf_moe")
  model_type = dense_type(cfg)
  return {"architectures": [DENSE_TYPES[model_type]], "model_type": model_type, **base_to_hf(cfg, dtype),
          "intermediate_size": cfg.d_ff, "mlp_bias": False}


def global_specs(cfg: ModelConfig) -> list[Spec]:
  """Embedding, final norm and (untied) output layer."""
  v, d = cfg.vocab_size, cfg.d_model
  glob = [Spec(("embed",), "model.embed_tokens.weight", (v, d), same, same),
          Spec(("final_norm", "scale"), "model.norm.weight", (d,), same, same)]
  if not cfg.tie_embeddings:
    glob.append(Spec(("lm_head",), "lm_head.weight", (v, d), transpose, transpose))
  return glob


def attention_specs(cfg: ModelConfig) -> list[Spec]:
  """One layer's attention and its two norms (names below `model.layers.{i}.`)."""
  d, h, k, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
  specs = [
      Spec(("attn", "wq"), "self_attn.q_proj.weight", (h * hd, d),  # [H*hd, D] <-> [D, H, hd]
           lambda w: w.T.reshape(d, h, hd), lambda p: p.reshape(d, h * hd).T),
      Spec(("attn", "wk"), "self_attn.k_proj.weight", (k * hd, d),
           lambda w: w.T.reshape(d, k, hd), lambda p: p.reshape(d, k * hd).T),
      Spec(("attn", "wv"), "self_attn.v_proj.weight", (k * hd, d),
           lambda w: w.T.reshape(d, k, hd), lambda p: p.reshape(d, k * hd).T),
      Spec(("attn", "wo"), "self_attn.o_proj.weight", (d, h * hd),  # [D, H*hd] <-> [H, hd, D]
           lambda w: w.T.reshape(h, hd, d), lambda p: p.reshape(h * hd, d).T),
      Spec(("attn_norm", "scale"), "input_layernorm.weight", (d,), same, same),
      Spec(("mlp_norm", "scale"), "post_attention_layernorm.weight", (d,), same, same),
  ]
  if cfg.qkv_bias:  # [H*hd] <-> [H, hd]
    specs += [Spec(("attn", f"b{n}"), f"self_attn.{n}_proj.bias", (heads * hd,),
                   lambda b, heads=heads: b.reshape(heads, hd), lambda p, heads=heads: p.reshape(heads * hd))
              for n, heads in (("q", h), ("k", k), ("v", k))]
  if cfg.qk_norm:
    specs += [Spec(("attn", f"{n}_norm"), f"self_attn.{n}_norm.weight", (hd,), same, same) for n in "qk"]
  return specs


def mlp_specs(d: int, f: int, key: tuple[str, ...], name: str) -> list[Spec]:
  """A SwiGLU MLP [D, F] / [F, D] <-> HF `{name}.gate_proj/up_proj/down_proj` [F, D] / [D, F]."""
  return [Spec(key + ("w_gate",), f"{name}.gate_proj.weight", (f, d), transpose, transpose),
          Spec(key + ("w_up",), f"{name}.up_proj.weight", (f, d), transpose, transpose),
          Spec(key + ("w_down",), f"{name}.down_proj.weight", (d, f), transpose, transpose)]


def layout(cfg: ModelConfig) -> tuple[list[Spec], list[Stack]]:
  """(global specs, stacks) of a dense model: one stack, every layer on `layers`."""
  layer = attention_specs(cfg) + mlp_specs(cfg.d_model, cfg.d_ff, ("mlp",), "mlp")
  return global_specs(cfg), [Stack(("layers",), np.arange(cfg.n_layers), layer)]


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict:
  """HF state dict (name -> [out, in] array) -> shardlab pure param dict in `cfg.param_dtype`."""
  return params_from_specs(tensors, *layout(cfg), cfg.param_dtype, cfg.tie_embeddings)


def params_to_hf(params: Mapping, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Shardlab pure param dict (numpy or jax arrays) -> HF state dict of contiguous numpy arrays."""
  return params_to_specs(params, *layout(cfg))


def load_hf_checkpoint(path: str | Path, **overrides: Any) -> tuple[ModelConfig, dict]:
  """Reads `config.json` and the safetensors of a HF Llama, Qwen2 or Qwen3 directory (one file, or
  shards listed in `model.safetensors.index.json`). `overrides` go to `config_from_hf` (e.g. param_dtype)."""
  hf_config, tensors = read_checkpoint(Path(path))
  cfg = config_from_hf(hf_config, **overrides)
  return cfg, params_from_hf(tensors, cfg)


def save_hf_checkpoint(path: str | Path, cfg: ModelConfig, params: Mapping, dtype: str = "float32") -> None:
  """Writes `config.json` and a single `model.safetensors` (tensors cast to `dtype`) into `path`."""
  write_checkpoint(Path(path), lambda hf_dtype: config_to_hf(cfg, hf_dtype), params_to_hf(params, cfg), dtype)


def model_with_params(cfg: ModelConfig, params: Mapping) -> Transformer:
  """A `Transformer` holding `params` (built abstractly: no random init is run)."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)  # every leaf is replaced: the names were checked on import
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)


def model_from_hf(path: str | Path, **overrides: Any) -> Transformer:
  """A `Transformer` holding a HF checkpoint's weights (built abstractly: no random init is run)."""
  return model_with_params(*load_hf_checkpoint(path, **overrides))


def export_model(model: Transformer, path: str | Path, dtype: str = "float32") -> None:
  """Writes `model` as a HF Llama, Qwen2 or Qwen3 checkpoint directory."""
  params = nnx.to_pure_dict(nnx.split(model)[1])
  save_hf_checkpoint(path, model.cfg, jax.tree.map(np.asarray, params), dtype)
