"""The pieces models/hf_common.py gives both interop modules, on hand-made specs and files."""

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models import hf_common
from models.hf_common import Spec, Stack


def _specs():
  glob = [Spec(("embed",), "model.embed_tokens.weight", (5, 3), hf_common.same, hf_common.same)]
  # Two HF layers stacked on our `layers`; the experts' [out, in] tensors stacked on a new axis.
  experts = Spec(("w",), ("mlp.experts.0.w.weight", "mlp.experts.1.w.weight"), (4, 3), hf_common.transpose,
                 hf_common.transpose)
  return glob, [Stack(("layers",), np.array([0, 1]), [experts])]


def test_params_from_and_to_specs_by_hand():
  rng = np.random.default_rng(0)
  hf = {"model.embed_tokens.weight": rng.normal(size=(5, 3)).astype(np.float32)}
  for layer in range(2):
    for e in range(2):
      hf[f"model.layers.{layer}.mlp.experts.{e}.w.weight"] = rng.normal(size=(4, 3)).astype(np.float32)
  glob, stacks = _specs()
  ours = hf_common.params_from_specs(hf, glob, stacks, "float32", tied=False)
  assert ours["layers"]["w"].shape == (2, 2, 3, 4)  # [layers, experts, in, out]
  np.testing.assert_array_equal(ours["layers"]["w"][1, 0], hf["model.layers.1.mlp.experts.0.w.weight"].T)
  np.testing.assert_array_equal(ours["embed"], hf["model.embed_tokens.weight"])
  back = hf_common.params_to_specs(ours, glob, stacks)
  assert set(back) == set(hf) and all(np.array_equal(back[n], hf[n]) for n in hf)


def test_unknown_and_missing_names_are_refused():
  glob, stacks = _specs()
  with pytest.raises(ValueError, match="model.layers.0.mlp.experts.0.w.weight"):
    hf_common.params_from_specs({"model.embed_tokens.weight": np.zeros((5, 3), np.float32)}, glob, stacks,
                                "float32", tied=False)


def test_bfloat16_checkpoint_reads_as_torch_reads_it(tmp_path):
  x = np.random.default_rng(1).normal(size=(3, 7)).astype(np.float32)
  hf_common.write_checkpoint(tmp_path, lambda dtype: {"torch_dtype": dtype}, {"w": x}, "bfloat16")
  config, tensors = hf_common.read_checkpoint(tmp_path)
  assert config == {"torch_dtype": "bfloat16"} and tensors["w"].dtype == np.dtype(ml_dtypes.bfloat16)
  expected = load_file(str(tmp_path / "model.safetensors"))["w"].to(torch.float32).numpy()
  np.testing.assert_array_equal(tensors["w"].astype(np.float32), expected)
