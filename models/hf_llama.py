"""Hugging Face Llama interop: `config.json` <-> `ModelConfig`, safetensors <-> shardlab parameters.

Shardlab's RoPE uses the Hugging Face rotate-half layout, so q/k projections need only reshapes and
transposes, never a head permutation. Hugging Face `nn.Linear` weights are [out, in]; ours are
[in, ...]. Per-layer tensors are stacked on a leading `layers` axis. Reading needs neither torch nor
transformers: safetensors are read as numpy, bfloat16 through `ml_dtypes`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from configs import ModelConfig
from models.transformer import Transformer

_ROPE_TYPES = ("default", "llama3")
# Buffers some old checkpoints carry; recomputed from the config, so skipped on import.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _np_dtype(name: str) -> np.dtype:
  return np.dtype(ml_dtypes.bfloat16) if name in ("bfloat16", "bf16") else np.dtype(name)


def _required(hf: Mapping[str, Any], name: str) -> Any:
  if hf.get(name) is None:
    raise ValueError(f"Hugging Face config: required field {name!r} is missing")
  return hf[name]


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> ModelConfig:
  """A `ModelConfig` from a Llama `config.json` dict (transformers 4.x `rope_theta`/`rope_scaling`
  or 5.x `rope_parameters` layout). `overrides` set non-architecture fields (param_dtype, remat...)."""
  hf = dict(hf_config)
  if hf.get("model_type", "llama") != "llama":
    raise ValueError(f"model_type={hf['model_type']!r} is not supported (only 'llama')")
  for name in ("attention_bias", "mlp_bias"):
    if hf.get(name):
      raise ValueError(f"{name}={hf[name]!r} is not supported (shardlab layers have no biases)")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in _ROPE_TYPES:
    raise ValueError(f"rope_type={rope_type!r} is not supported (choose one of {_ROPE_TYPES})")
  partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    raise ValueError(f"partial_rotary_factor={partial!r} is not supported (only 1.0)")
  d_model, n_heads = _required(hf, "hidden_size"), _required(hf, "num_attention_heads")
  head_dim = hf.get("head_dim") or d_model // n_heads
  max_len = _required(hf, "max_position_embeddings")
  scaling = {}
  if rope_type == "llama3":
    scaling = dict(rope_scaling_factor=float(_required(rope, "factor")),
                   rope_low_freq_factor=float(_required(rope, "low_freq_factor")),
                   rope_high_freq_factor=float(_required(rope, "high_freq_factor")),
                   rope_original_max_len=int(rope.get("original_max_position_embeddings") or max_len))
  return ModelConfig(
      vocab_size=_required(hf, "vocab_size"), d_model=d_model, n_layers=_required(hf, "num_hidden_layers"),
      n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
      head_dim=0 if head_dim == d_model // n_heads else head_dim, d_ff=_required(hf, "intermediate_size"),
      max_seq_len=max_len, rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      **scaling, **overrides)


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
  """A Llama `config.json` dict. RoPE is written in both layouts: `rope_theta`/`rope_scaling`
  (transformers 4.x and most other readers) and `rope_parameters` (transformers 5.x)."""
  scaling = None
  if cfg.rope_scaling_factor != 1.0:
    scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
               "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
               "original_max_position_embeddings": cfg.rope_original_max_len}
  rope_parameters = {**(scaling or {"rope_type": "default"}), "rope_theta": float(cfg.rope_theta)}
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.d_model,
      "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.resolved_head_dim, "vocab_size": cfg.vocab_size,
      "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
      "rope_theta": float(cfg.rope_theta), "rope_scaling": scaling, "rope_parameters": rope_parameters,
      "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
      "mlp_bias": False, "torch_dtype": dtype, "dtype": dtype,
  }


def _specs(cfg: ModelConfig) -> tuple[list[tuple], list[tuple]]:
  """(global, per-layer) specs: (our key path, HF name, HF shape, hf->ours, ours->hf)."""
  d, h, k, hd, f, v = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, cfg.d_ff, cfg.vocab_size
  same, t = (lambda w: w), (lambda w: w.T)
  glob = [(("embed",), "model.embed_tokens.weight", (v, d), same, same),
          (("final_norm", "scale"), "model.norm.weight", (d,), same, same)]
  if not cfg.tie_embeddings:
    glob.append((("lm_head",), "lm_head.weight", (v, d), t, t))
  layer = [
      (("attn", "wq"), "self_attn.q_proj.weight", (h * hd, d),  # [H*hd, D] <-> [D, H, hd]
       lambda w: w.T.reshape(d, h, hd), lambda p: p.reshape(d, h * hd).T),
      (("attn", "wk"), "self_attn.k_proj.weight", (k * hd, d),
       lambda w: w.T.reshape(d, k, hd), lambda p: p.reshape(d, k * hd).T),
      (("attn", "wv"), "self_attn.v_proj.weight", (k * hd, d),
       lambda w: w.T.reshape(d, k, hd), lambda p: p.reshape(d, k * hd).T),
      (("attn", "wo"), "self_attn.o_proj.weight", (d, h * hd),  # [D, H*hd] <-> [H, hd, D]
       lambda w: w.T.reshape(h, hd, d), lambda p: p.reshape(h * hd, d).T),
      (("mlp", "w_gate"), "mlp.gate_proj.weight", (f, d), t, t),
      (("mlp", "w_up"), "mlp.up_proj.weight", (f, d), t, t),
      (("mlp", "w_down"), "mlp.down_proj.weight", (d, f), t, t),
      (("attn_norm", "scale"), "input_layernorm.weight", (d,), same, same),
      (("mlp_norm", "scale"), "post_attention_layernorm.weight", (d,), same, same),
  ]
  return glob, [(("layers",) + key, name, shape, fwd, bwd) for key, name, shape, fwd, bwd in layer]


def _check_names(found: set[str], expected: set[str], what: str) -> None:
  if missing := sorted(expected - found):
    raise ValueError(f"{what}: missing {len(missing)} tensor(s): {', '.join(missing[:8])}")
  if unexpected := sorted(found - expected):
    raise ValueError(f"{what}: unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:8])}")


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict:
  """HF state dict (name -> [out, in] array) -> shardlab pure param dict in `cfg.param_dtype`."""
  glob, layer = _specs(cfg)
  tensors = {n: a for n, a in tensors.items() if not n.endswith(_IGNORED_SUFFIXES)}
  if cfg.tie_embeddings and {"lm_head.weight", "model.embed_tokens.weight"} <= set(tensors):
    if not np.array_equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):  # a stored copy?
      raise ValueError("lm_head.weight: present and different from the embedding, but tie_word_embeddings=True")
    tensors.pop("lm_head.weight")
  layer_names = {i: [f"model.layers.{i}.{s[1]}" for s in layer] for i in range(cfg.n_layers)}
  _check_names(set(tensors), {s[1] for s in glob} | {n for ns in layer_names.values() for n in ns}, "params_from_hf")
  dtype = _np_dtype(cfg.param_dtype)

  def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
    a = np.asarray(tensors[name])
    if a.shape != shape:
      raise ValueError(f"{name}: shape {a.shape}, expected {shape} from the config")
    return a.astype(dtype)

  params: dict = {}
  for key, name, shape, fwd, _ in glob:
    _set(params, key, np.ascontiguousarray(fwd(get(name, shape))))
  for j, (key, _, shape, fwd, _) in enumerate(layer):
    _set(params, key, np.stack([fwd(get(layer_names[i][j], shape)) for i in range(cfg.n_layers)]))
  return params


def params_to_hf(params: Mapping, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Shardlab pure param dict (numpy or jax arrays) -> HF state dict of contiguous numpy arrays."""
  glob, layer = _specs(cfg)
  flat = {k: v for k, v in _flatten(params).items() if v is not None}  # tied: lm_head may be None
  _check_names({".".join(k) for k in flat}, {".".join(s[0]) for s in glob + layer}, "params_to_hf")
  out = {}
  for specs, lead in ((glob, ()), (layer, (cfg.n_layers,))):
    for key, name, shape, fwd, bwd in specs:
      a = np.asarray(flat[key])
      expected = lead + jax.eval_shape(fwd, jax.ShapeDtypeStruct(shape, np.float32)).shape
      if a.shape != expected:
        raise ValueError(f"{'.'.join(key)}: shape {a.shape}, expected {expected} from the config")
      if not lead:
        out[name] = np.ascontiguousarray(bwd(a))
      for i in range(cfg.n_layers if lead else 0):
        out[f"model.layers.{i}.{name}"] = np.ascontiguousarray(bwd(a[i]))
  return out


def _set(tree: dict, key: tuple[str, ...], value: Any) -> None:
  for k in key[:-1]:
    tree = tree.setdefault(k, {})
  tree[key[-1]] = value


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, prefix + (str(k),)) if isinstance(v, Mapping) else {prefix + (str(k),): v})
  return out


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
  """All tensors of one file as numpy; bfloat16 (which safetensors' numpy backend rejects) via ml_dtypes."""
  with safe_open(str(file), framework="np") as f:
    bf16 = {n for n in f.keys() if f.get_slice(n).get_dtype() == "BF16"}
    out = {n: f.get_tensor(n) for n in f.keys() if n not in bf16}
  if bf16:
    with open(file, "rb") as fh:  # layout: u64 little-endian header size, JSON header, raw data
      n = struct.unpack("<Q", fh.read(8))[0]
      header = json.loads(fh.read(n))
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + n)
    for name in bf16:
      start, end = header[name]["data_offsets"]
      out[name] = np.asarray(data[start:end]).view(ml_dtypes.bfloat16).reshape(header[name]["shape"])
  return out


def load_hf_checkpoint(path: str | Path, **overrides: Any) -> tuple[ModelConfig, dict]:
  """Reads `config.json` and the safetensors of a HF Llama directory (one file, or shards listed in
  `model.safetensors.index.json`). `overrides` go to `config_from_hf` (e.g. param_dtype)."""
  path = Path(path)
  cfg = config_from_hf(json.loads((path / "config.json").read_text()), **overrides)
  index = path / "model.safetensors.index.json"
  files = ([path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
           if index.exists() else sorted(path.glob("*.safetensors")))
  if not files:
    raise FileNotFoundError(f"no *.safetensors files in {path}")
  tensors: dict[str, np.ndarray] = {}
  for file in files:
    for name, a in _read_safetensors(file).items():
      if name in tensors:
        raise ValueError(f"{name}: found in more than one safetensors file ({file.name})")
      tensors[name] = a
  return cfg, params_from_hf(tensors, cfg)


def save_hf_checkpoint(path: str | Path, cfg: ModelConfig, params: Mapping, dtype: str = "float32") -> None:
  """Writes `config.json` and a single `model.safetensors` (tensors cast to `dtype`) into `path`."""
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  np_dtype = _np_dtype(dtype)
  tensors = {n: np.ascontiguousarray(a.astype(np_dtype)) for n, a in params_to_hf(params, cfg).items()}
  save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
  hf_dtype = "bfloat16" if np_dtype == np.dtype(ml_dtypes.bfloat16) else np_dtype.name
  (path / "config.json").write_text(json.dumps(config_to_hf(cfg, hf_dtype), indent=2) + "\n")


def model_from_hf(path: str | Path, rngs_seed: int = 0, **overrides: Any) -> Transformer:
  """A `Transformer` holding a HF checkpoint's weights (built abstractly: no random init is run)."""
  cfg, params = load_hf_checkpoint(path, **overrides)
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(rngs_seed)))
  graphdef, state = nnx.split(abstract)  # every leaf is replaced: params_from_hf checked the names
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)


def export_model(model: Transformer, path: str | Path, dtype: str = "float32") -> None:
  """Writes `model` as a HF Llama checkpoint directory."""
  params = nnx.to_pure_dict(nnx.split(model)[1])
  save_hf_checkpoint(path, model.cfg, jax.tree.map(np.asarray, params), dtype)
