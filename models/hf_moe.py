"""Hugging Face mixture-of-experts interop (Mixtral, Qwen2-MoE, Qwen3-MoE), and one loader for every
supported architecture: `load_hf` reads `config.json` and picks Llama, Qwen2, Qwen3 (through
`models.hf_llama`), Mixtral, Qwen2-MoE or Qwen3-MoE.

Mapping of one sparse layer (HF `nn.Linear` weights are [out, in]; ours [in, out]; E experts):
  router   [D, E]     <- `{moe}.gate.weight` [E, D]           ({moe}: Mixtral `block_sparse_moe`, Qwen `mlp`)
  w_gate   [E, D, F]  <- `{moe}.experts.{e}.w1 | gate_proj.weight` [F, D], stacked over e
  w_up     [E, D, F]  <- `{moe}.experts.{e}.w3 | up_proj.weight`   [F, D]
  w_down   [E, F, D]  <- `{moe}.experts.{e}.w2 | down_proj.weight` [D, F]
  shared   SwiGLU [D, S*Fs] <- Qwen2-MoE `mlp.shared_expert.*` (one HF expert of width S*Fs: shardlab
           fuses its S shared experts into one MLP, which is the same function)
  shared_gate [D]     <- Qwen2-MoE `mlp.shared_expert_gate.weight` [1, D]
  router_bias [E]     zero on import (HF routers have no balancing bias); export refuses a non-zero one
Dense and sparse layers sit in two stacks, `layers` and `moe_layers` (`models.moe.layer_slots`).
Routers are softmax over experts then top-k (all three families); Mixtral always renormalises the
top-k weights, Qwen-MoE when `norm_topk_prob`. Sparse layers: Qwen's `mlp_only_layers` must be a
prefix (`model.moe_first_dense`) and `decoder_sparse_step` becomes `model.moe_every`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from configs import Config, ModelConfig
from models import hf_llama
from models.hf_common import (Spec, Stack, params_from_specs, params_to_specs, read_checkpoint, required,
                              transpose, write_checkpoint)
from models.moe import expert_width, is_sparse, layer_slots, shared_width
from models.transformer import Transformer

MOE_TYPES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
             "qwen3_moe": "Qwen3MoeForCausalLM"}
MODEL_TYPES = tuple(hf_llama.DENSE_TYPES) + tuple(MOE_TYPES)


def _sparse_rule(hf: Mapping[str, Any], base: ModelConfig) -> tuple[int, int]:
  """(moe_first_dense, moe_every) giving exactly Qwen-MoE's sparse layers: layer i is sparse when
  i is not in `mlp_only_layers` and (i + 1) % decoder_sparse_step == 0."""
  step, dense = hf.get("decoder_sparse_step", 1), sorted(hf.get("mlp_only_layers") or [])
  if not isinstance(step, int) or step < 1:
    raise ValueError(f"decoder_sparse_step={step} is not supported (must be >= 1)")
  sparse = [i for i in range(base.n_layers) if i not in dense and (i + 1) % step == 0]
  first = dense[-1] + 1 if dense else 0
  ours = dataclasses.replace(base, moe_first_dense=first, moe_every=step)
  if [i for i in range(base.n_layers) if is_sparse(ours, i)] != sparse:
    raise ValueError(f"mlp_only_layers={dense} with decoder_sparse_step={step}: sparse layers {sparse} are not "
                     "'the first k layers dense, then every n-th' (model.moe_first_dense, model.moe_every)")
  return first, step


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> ModelConfig:
  """A `ModelConfig` from the `config.json` dict of any supported architecture (`MODEL_TYPES`).
  `overrides` set non-architecture fields (param_dtype, compute_dtype, remat...)."""
  hf = dict(hf_config)
  model_type = hf.get("model_type", "llama")
  if model_type in hf_llama.DENSE_TYPES:
    return hf_llama.config_from_hf(hf, **overrides)
  if model_type not in MOE_TYPES:
    raise ValueError(f"model_type={model_type!r} is not supported (choose one of {MODEL_TYPES})")
  base = hf_llama.base_fields(hf, model_type)
  top_k = required(hf, "num_experts_per_tok")
  if model_type == "mixtral":
    width = required(hf, "intermediate_size")
    moe = dict(n_experts=required(hf, "num_local_experts"), d_ff=width, expert_d_ff=width, router_topk_norm=True)
  else:
    n_experts = hf.get("num_experts") or required(hf, "num_local_experts")  # Qwen3-MoE: either name
    moe = dict(n_experts=n_experts, d_ff=required(hf, "intermediate_size"),
               expert_d_ff=required(hf, "moe_intermediate_size"),
               router_topk_norm=bool(hf.get("norm_topk_prob", False)))
    if model_type == "qwen2_moe":
      shared = required(hf, "shared_expert_intermediate_size")
      if shared <= 0:
        raise ValueError(f"shared_expert_intermediate_size={shared} is not supported (must be > 0)")
      moe.update(n_shared_experts=1, shared_expert_d_ff=shared, shared_expert_gate=True)
  cfg = ModelConfig(**base, **moe, experts_top_k=top_k, router_score="softmax", **overrides)
  if model_type != "mixtral":
    first, every = _sparse_rule(hf, cfg)
    cfg = dataclasses.replace(cfg, moe_first_dense=first, moe_every=every)
  return cfg


def moe_type(cfg: ModelConfig) -> str:
  """The HF architecture that represents `cfg` exactly, or a ValueError naming what does not fit."""
  if cfg.router_score != "softmax":
    raise ValueError(f"model.router_score={cfg.router_score!r}: Mixtral and Qwen-MoE routers are 'softmax'")
  for name, value, plain in (("routed_scale", cfg.routed_scale, 1.0), ("router_groups", cfg.router_groups, 1)):
    if value != plain:
      raise ValueError(f"model.{name}={value!r} has no Mixtral or Qwen-MoE equivalent (only {plain!r})")
  if cfg.n_shared_experts:
    if not cfg.shared_expert_gate:
      raise ValueError("model.n_shared_experts > 0 without model.shared_expert_gate: Qwen2-MoE (the only "
                       "exported architecture with shared experts) always gates them")
    if cfg.qk_norm:
      raise ValueError("model.qk_norm=True with shared experts: Qwen2-MoE has no q/k norm")
    return "qwen2_moe"
  if cfg.shared_expert_gate:
    raise ValueError("model.shared_expert_gate=True without shared experts (model.n_shared_experts=0)")
  if cfg.qk_norm:
    if cfg.qkv_bias:
      raise ValueError("model.qkv_bias=True with model.qk_norm=True: Qwen3-MoE's attention_bias also puts a "
                       "bias on o_proj")
    return "qwen3_moe"
  if cfg.qkv_bias:
    raise ValueError("model.qkv_bias=True without shared experts: Qwen2-MoE always has a shared expert")
  if not cfg.router_topk_norm:
    raise ValueError("model.router_topk_norm=False without q/k norm or shared experts: Mixtral always "
                     "renormalises the top-k weights")
  if cfg.moe_first_dense != 0 or cfg.moe_every != 1:
    raise ValueError(f"model.moe_first_dense={cfg.moe_first_dense}, model.moe_every={cfg.moe_every}: Mixtral "
                     "has every layer sparse (0, 1)")
  return "mixtral"


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
  """The `config.json` dict of `cfg`'s architecture (dense: Llama/Qwen2/Qwen3; see `moe_type`)."""
  if not cfg.n_experts:
    return hf_llama.config_to_hf(cfg, dtype)
  model_type = moe_type(cfg)
  out = {"architectures": [MOE_TYPES[model_type]], "model_type": model_type, **hf_llama.base_to_hf(cfg, dtype),
         "num_experts_per_tok": cfg.experts_top_k}
  if model_type == "mixtral":
    return {**out, "num_local_experts": cfg.n_experts, "intermediate_size": expert_width(cfg),
            "router_jitter_noise": 0.0}
  out.update(num_experts=cfg.n_experts, intermediate_size=cfg.d_ff, moe_intermediate_size=expert_width(cfg),
             norm_topk_prob=cfg.router_topk_norm, decoder_sparse_step=cfg.moe_every,
             mlp_only_layers=list(range(min(cfg.moe_first_dense, cfg.n_layers))))
  if model_type == "qwen2_moe":
    out.update(shared_expert_intermediate_size=shared_width(cfg), qkv_bias=cfg.qkv_bias)
  return out


def moe_specs(cfg: ModelConfig, model_type: str) -> list[Spec]:
  """One sparse layer's MLP (names below `model.layers.{i}.`; see the module docstring)."""
  d, e, f = cfg.d_model, cfg.n_experts, expert_width(cfg)
  moe, (gate, up, down) = (("block_sparse_moe", ("w1", "w3", "w2")) if model_type == "mixtral"
                           else ("mlp", ("gate_proj", "up_proj", "down_proj")))
  experts = lambda n: tuple(f"{moe}.experts.{j}.{n}.weight" for j in range(e))
  specs = [Spec(("mlp", "router"), f"{moe}.gate.weight", (e, d), transpose, transpose),
           Spec(("mlp", "w_gate"), experts(gate), (f, d), transpose, transpose),  # [E, F, D] <-> [E, D, F]
           Spec(("mlp", "w_up"), experts(up), (f, d), transpose, transpose),
           Spec(("mlp", "w_down"), experts(down), (d, f), transpose, transpose)]
  if cfg.n_shared_experts:
    specs += hf_llama.mlp_specs(d, shared_width(cfg), ("mlp", "shared"), "mlp.shared_expert")
  if cfg.shared_expert_gate:
    specs.append(Spec(("mlp", "shared_gate"), "mlp.shared_expert_gate.weight", (1, d),
                      lambda w: w[0], lambda p: p[None]))
  return specs


def layout(cfg: ModelConfig) -> tuple[list[Spec], list[Stack]]:
  """(global specs, stacks): dense layers on `layers`, sparse ones on `moe_layers`."""
  if not cfg.n_experts:
    return hf_llama.layout(cfg)
  slots = layer_slots(cfg)
  attention = hf_llama.attention_specs(cfg)
  dense = hf_llama.mlp_specs(cfg.d_model, cfg.d_ff, ("mlp",), "mlp")
  stacks = []
  for stack, mlp in (("layers", dense), ("moe_layers", moe_specs(cfg, moe_type(cfg)))):
    indices = np.array([i for i, (s, _) in enumerate(slots) if s == stack], np.int64)
    if indices.size:
      stacks.append(Stack((stack,), indices, attention + mlp))
  return hf_llama.global_specs(cfg), stacks


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict:
  """HF state dict -> shardlab pure param dict (with zero router biases), every name and shape checked."""
  params = params_from_specs(tensors, *layout(cfg), cfg.param_dtype, cfg.tie_embeddings)
  if "moe_layers" in params:
    n_sparse = params["moe_layers"]["mlp"]["router"].shape[0]
    params["moe_layers"]["mlp"]["router_bias"] = np.zeros((n_sparse, cfg.n_experts), np.float32)
  return params


def params_to_hf(params: Mapping, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Shardlab pure param dict, router biases included (the model's `nnx.to_pure_dict`; a train
  state keeps them outside "params": `training.state.with_router_bias` puts them back) -> HF state
  dict. A non-zero `router_bias` (auxiliary-loss-free balancing) changes which experts are picked
  and has no HF equivalent: refused, and so is a missing one, which could hide a non-zero one."""
  if "moe_layers" in params:
    mlp = dict(params["moe_layers"].get("mlp", {}))
    if "router_bias" not in mlp:
      raise ValueError("moe_layers.mlp.router_bias: missing (a train state keeps it outside 'params': "
                       "pass training.state.with_router_bias(state['params'], state['router_bias']))")
    bias = np.asarray(mlp.pop("router_bias"))
    if np.any(bias != 0):
      raise ValueError(f"moe_layers.mlp.router_bias: non-zero (max |bias| {np.abs(bias).max():.3g}); "
                       "Mixtral and Qwen-MoE routers have no selection bias")
    params = {**params, "moe_layers": {**params["moe_layers"], "mlp": mlp}}
  return params_to_specs(params, *layout(cfg))


def load_hf(path: str | Path, **overrides: Any) -> tuple[ModelConfig, dict]:
  """(config, pure params) of a HF checkpoint directory of any of `MODEL_TYPES`, chosen by its
  `config.json`; safetensors in one file or sharded. `overrides` go to `config_from_hf`."""
  hf_config, tensors = read_checkpoint(Path(path))
  cfg = config_from_hf(hf_config, **overrides)
  return cfg, params_from_hf(tensors, cfg)


# What a run keeps of its own model section when a HF directory gives the architecture.
KEPT_FIELDS = ("param_dtype", "compute_dtype", "attention_impl", "decode_attention", "decode_split_k", "scan_unroll",
               "remat")


def config_with_hf(config: Config, path: str | Path) -> Config:
  """`config` with the architecture of a HF directory's `config.json` (any of `MODEL_TYPES`): its
  model section replaced, `KEPT_FIELDS` kept from `config.model`; with `data.tokenizer` "bytes" and
  a `tokenizer.json` in the directory, that tokenizer. Reads no weights (`params_from_dir` does)."""
  path = Path(path)
  if not (path / "config.json").is_file():
    raise FileNotFoundError(f"{path}: not a Hugging Face model directory (no config.json)")
  kept = {f: getattr(config.model, f) for f in KEPT_FIELDS}
  model = config_from_hf(json.loads((path / "config.json").read_text()), **kept)
  data = config.data
  if data.tokenizer == "bytes" and os.path.isfile(path / "tokenizer.json"):
    data = dataclasses.replace(data, tokenizer=str(path))
  return dataclasses.replace(config, model=model, data=data)


def params_from_dir(path: str | Path, cfg: ModelConfig) -> dict:
  """The pure parameters of a HF directory's safetensors for `cfg` (`config_with_hf(...).model`)."""
  return params_from_hf(read_checkpoint(Path(path))[1], cfg)


def save_hf(path: str | Path, cfg: ModelConfig, params: Mapping, dtype: str = "float32") -> None:
  """Writes `config.json` and one `model.safetensors` (cast to `dtype`) for `cfg`'s architecture."""
  write_checkpoint(Path(path), lambda hf_dtype: config_to_hf(cfg, hf_dtype), params_to_hf(params, cfg), dtype)


def model_from_hf(path: str | Path, **overrides: Any) -> Transformer:
  """A `Transformer` holding the checkpoint's weights (built abstractly: no random init is run)."""
  return hf_llama.model_with_params(*load_hf(path, **overrides))


def export_model(model: Transformer, path: str | Path, dtype: str = "float32") -> None:
  """Writes `model` as a checkpoint of its HF architecture."""
  params = nnx.to_pure_dict(nnx.split(model)[1])
  save_hf(path, model.cfg, jax.tree.map(np.asarray, params), dtype)
