"""Loading what a server serves: a shardlab checkpoint (parameters only) and a Hugging Face Llama
directory; the engine over them decodes greedy as the full forward pass does, and as
`transformers` `generate` does for the Hugging Face model."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
import transformers

import configs
from parallel.plan import single_device_plan
from serving.engine import Engine
from serving.loading import load
from tests.serving import tiny
from tests.serving.tiny import greedy, run

OVERRIDES = ["data.seq_len=64", "data.global_batch=8"]


def config_for(cfg):
  config = configs.get_config("tiny", OVERRIDES)
  return dataclasses.replace(config, model=cfg)


def engine_for(loaded, eos_id=None):
  return Engine(loaded.config.model, loaded.params, plan=single_device_plan(), slots=2, token_budget=16,
                max_len=tiny.MAX_LEN, eos_id=eos_id)


def test_checkpoint_params_only(tmp_path):
  """A trained model saved as a training run saves it (parameters and optimizer state), restored
  parameters-only and decoded."""
  from training.checkpoint import Checkpointer
  from training.state import build_setup, init_state

  config = config_for(tiny.CFG)
  plan = single_device_plan()
  setup = build_setup(config, plan)
  state = init_state(setup, tiny.trained_params())
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), config.checkpoint)
  ckpt.save(7, state, {"position": 0}, config)
  ckpt.close()
  loaded = load(config, checkpoint=str(tmp_path), devices=jax.devices()[:1])
  assert loaded.tokenizer.eos_id == 256 and loaded.plan.mesh.size == 1
  prompts = [tiny.PATTERN[:5], tiny.PATTERN[10:13]]
  out = run(engine_for(loaded), [greedy(str(i), p, 8) for i, p in enumerate(prompts)])
  for i, p in enumerate(prompts):
    assert out[str(i)][0] == tiny.reference_decode(tiny.trained_params(), p, 8)[0]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                                       attn_implementation="eager")
  model = transformers.LlamaForCausalLM(hf_config).eval()
  with torch.no_grad():  # the default init is near 0 everywhere; spread the logits so argmax is clear-cut
    for p in model.parameters():
      p.mul_(4.0 if p.ndim > 1 else 1.0)
  path = tmp_path_factory.mktemp("hf")
  model.save_pretrained(path)
  return path, model


def test_hf_llama_equals_transformers_generate(hf_dir):
  path, model = hf_dir
  loaded = load(config_for(tiny.CFG), hf=str(path), devices=jax.devices()[:1])
  assert loaded.config.model.vocab_size == 264 and loaded.config.model.max_seq_len == 64
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 264, n) for n in (4, 19)]
  out = run(engine_for(loaded), [greedy(str(i), p, 10) for i, p in enumerate(prompts)])
  for i, p in enumerate(prompts):
    with torch.no_grad():
      ids = model.generate(torch.tensor(np.asarray([p])), max_new_tokens=10, do_sample=False, min_new_tokens=10,
                           pad_token_id=0)
    want = ids[0, len(p):].tolist()
    assert out[str(i)][0] == want, f"request {i}"
    cfg = loaded.config.model
    assert out[str(i)][0] == tiny.reference_decode(loaded.params, p, 10, cfg=cfg)[0]
