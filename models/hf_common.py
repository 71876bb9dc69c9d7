"""What every Hugging Face interop module shares: tensor specs, the checked mapping between a HF
state dict and shardlab's stacked parameters, and safetensors reading/writing without torch.

A `Spec` maps one shardlab parameter to one HF tensor, or to several (the routed experts of an
MoE layer are one [E, ...] parameter here and E tensors there). A `Stack` is a group of HF layers
whose parameters are stacked here on leading axes (`layers`, or the layout of a mixed dense/sparse
stack); `indices` holds the HF layer numbers in stack order, with the stacked axes' shape.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

# Buffers some old checkpoints carry; recomputed from the config, so skipped on import.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class Spec(NamedTuple):
  """key: our path (below the stack); name: the HF name (below `model.layers.{i}.` in a stack), or
  a tuple of names stacked on a new leading axis; shape: each HF tensor's shape; to_ours: HF
  array (stacked if several) -> ours; to_hf: ours -> HF array (stacked if several)."""
  key: tuple[str, ...]
  name: str | tuple[str, ...]
  shape: tuple[int, ...]
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


class Stack(NamedTuple):
  prefix: tuple[str, ...]  # our path of the stacked subtree, e.g. ("layers",)
  indices: np.ndarray  # int, HF layer numbers; its shape is the stacked leading axes
  specs: Sequence[Spec]


def same(w: np.ndarray) -> np.ndarray:
  return w


def transpose(w: np.ndarray) -> np.ndarray:
  """HF `nn.Linear` weights are [out, in]; ours are [in, out]. Works on stacked [E, out, in] too."""
  return np.swapaxes(w, -1, -2)


def np_dtype(name: str) -> np.dtype:
  return np.dtype(ml_dtypes.bfloat16) if name in ("bfloat16", "bf16") else np.dtype(name)


def required(hf: Mapping[str, Any], name: str) -> Any:
  if hf.get(name) is None:
    raise ValueError(f"Hugging Face config: required field {name!r} is missing")
  return hf[name]


def _names(spec: Spec) -> tuple[str, ...]:
  return spec.name if isinstance(spec.name, tuple) else (spec.name,)


def _hf_names(glob: Sequence[Spec], stacks: Sequence[Stack]) -> set[str]:
  names = {n for s in glob for n in _names(s)}
  for stack in stacks:
    names |= {f"model.layers.{i}.{n}" for i in stack.indices.ravel() for s in stack.specs for n in _names(s)}
  return names


def check_names(found: set[str], expected: set[str], what: str) -> None:
  if missing := sorted(expected - found):
    raise ValueError(f"{what}: missing {len(missing)} tensor(s): {', '.join(missing[:8])}")
  if unexpected := sorted(found - expected):
    raise ValueError(f"{what}: unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:8])}")


def set_path(tree: dict, key: tuple[str, ...], value: Any) -> None:
  for k in key[:-1]:
    tree = tree.setdefault(k, {})
  tree[key[-1]] = value


def flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    out.update(flatten(v, prefix + (str(k),)) if isinstance(v, Mapping) else {prefix + (str(k),): v})
  return out


def params_from_specs(tensors: Mapping[str, np.ndarray], glob: Sequence[Spec], stacks: Sequence[Stack],
                      dtype: str, tied: bool) -> dict:
  """HF state dict (name -> [out, in] array) -> shardlab pure param dict in `dtype`, every name checked."""
  tensors = {n: a for n, a in tensors.items() if not n.endswith(IGNORED_SUFFIXES)}
  if tied and {"lm_head.weight", "model.embed_tokens.weight"} <= set(tensors):
    if not np.array_equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):  # a stored copy?
      raise ValueError("lm_head.weight: present and different from the embedding, but tie_word_embeddings=True")
    tensors.pop("lm_head.weight")
  check_names(set(tensors), _hf_names(glob, stacks), "params_from_hf")
  dt = np_dtype(dtype)

  def get(spec: Spec, prefix: str = "") -> np.ndarray:
    parts = []
    for name in _names(spec):
      a = np.asarray(tensors[prefix + name])
      if a.shape != spec.shape:
        raise ValueError(f"{prefix + name}: shape {a.shape}, expected {spec.shape} from the config")
      parts.append(a.astype(dt))
    return spec.to_ours(np.stack(parts) if isinstance(spec.name, tuple) else parts[0])

  params: dict = {}
  for spec in glob:
    set_path(params, spec.key, np.ascontiguousarray(get(spec)))
  for stack in stacks:
    for spec in stack.specs:
      layers = [get(spec, f"model.layers.{i}.") for i in stack.indices.ravel()]
      set_path(params, stack.prefix + spec.key, np.stack(layers).reshape(stack.indices.shape + layers[0].shape))
  return params


def params_to_specs(params: Mapping, glob: Sequence[Spec], stacks: Sequence[Stack]) -> dict[str, np.ndarray]:
  """Shardlab pure param dict (numpy or jax arrays) -> HF state dict of contiguous numpy arrays."""
  flat = {k: v for k, v in flatten(params).items() if v is not None}  # tied: lm_head may be None
  ours = [s.key for s in glob] + [st.prefix + s.key for st in stacks for s in st.specs]
  check_names({".".join(k) for k in flat}, {".".join(k) for k in ours}, "params_to_hf")
  out = {}

  def put(spec: Spec, a: np.ndarray, prefix: str = "") -> None:
    hf = spec.to_hf(a)
    for j, name in enumerate(_names(spec)):
      out[prefix + name] = np.ascontiguousarray(hf[j] if isinstance(spec.name, tuple) else hf)

  def ours_shape(spec: Spec) -> tuple[int, ...]:
    lead = (len(spec.name),) if isinstance(spec.name, tuple) else ()
    return jax.eval_shape(spec.to_ours, jax.ShapeDtypeStruct(lead + spec.shape, np.float32)).shape

  for lead, prefix, indices, specs in [((), (), None, glob)] + [
      (st.indices.shape, st.prefix, st.indices.ravel(), st.specs) for st in stacks]:
    for spec in specs:
      key = prefix + spec.key
      a = np.asarray(flat[key])
      if a.shape != lead + ours_shape(spec):
        raise ValueError(f"{'.'.join(key)}: shape {a.shape}, expected {lead + ours_shape(spec)} from the config")
      if indices is None:
        put(spec, a)
      else:
        for i, layer in zip(indices, a.reshape((-1,) + a.shape[len(lead):])):
          put(spec, layer, f"model.layers.{i}.")
  return out


def read_safetensors(file: Path) -> dict[str, np.ndarray]:
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


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(`config.json` as a dict, every tensor) of a HF directory: one safetensors file, or the shards
  listed in `model.safetensors.index.json`."""
  hf_config = json.loads((path / "config.json").read_text())
  index = path / "model.safetensors.index.json"
  files = ([path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
           if index.exists() else sorted(path.glob("*.safetensors")))
  if not files:
    raise FileNotFoundError(f"no *.safetensors files in {path}")
  tensors: dict[str, np.ndarray] = {}
  for file in files:
    for name, a in read_safetensors(file).items():
      if name in tensors:
        raise ValueError(f"{name}: found in more than one safetensors file ({file.name})")
      tensors[name] = a
  return hf_config, tensors


def write_checkpoint(path: Path, hf_config: Callable[[str], dict[str, Any]], tensors: Mapping[str, np.ndarray],
                     dtype: str) -> None:
  """Writes `config.json` (`hf_config(torch dtype name)`) and one `model.safetensors` cast to `dtype`."""
  path.mkdir(parents=True, exist_ok=True)
  dt = np_dtype(dtype)
  save_file({n: np.ascontiguousarray(a.astype(dt)) for n, a in tensors.items()}, str(path / "model.safetensors"),
            metadata={"format": "pt"})
  hf_dtype = "bfloat16" if dt == np.dtype(ml_dtypes.bfloat16) else dt.name
  (path / "config.json").write_text(json.dumps(hf_config(hf_dtype), indent=2) + "\n")
