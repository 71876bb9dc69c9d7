"""Per-device bytes of parameters, gradients and optimizer state follow each ZeRO stage and TP layout."""

import dataclasses

import jax
import numpy as np
import pytest

from configs import Config, DataConfig, MeshConfig, ModelConfig, ShardingConfig
from training.grad import make_grad_fn
from training.state import bytes_per_device, init_state, setup_from_config

MODEL = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=8, d_ff=128, max_seq_len=16)
D, LAYERS = MODEL.d_model, MODEL.n_layers


def _measure(mesh: dict, zero: int, model: ModelConfig = MODEL):
  cfg = Config(model=model, mesh=MeshConfig(**{"data": 1, **mesh}), sharding=ShardingConfig(zero_stage=zero),
               data=DataConfig(seq_len=16, global_batch=8))
  setup = setup_from_config(cfg)
  state = init_state(setup)
  batch = {k: np.zeros((8, 16), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
  batch["loss_mask"] = np.ones((8, 16), np.float32)
  batch = jax.device_put(batch, setup.batch_sharding)
  grads = jax.jit(make_grad_fn(setup))(state["params"], batch)[0]
  # Adam's moments; the step counters are replicated scalars.
  moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0]
  return bytes_per_device(state["params"]), bytes_per_device(grads), bytes_per_device(moments)


@pytest.fixture(scope="module")
def full():
  """Unsharded bytes: DDP keeps a full copy of everything on every device."""
  params, grads, moments = _measure({"data": 8}, 0)
  assert grads == params and moments == 2 * params
  return params


@pytest.mark.parametrize("zero,param_div,grad_div,opt_div", [
    (1, 1, 1, 8),  # ZeRO-1: optimizer state split 8 ways
    (2, 1, 8, 8),  # ZeRO-2: + gradients
    (3, 8, 8, 8),  # ZeRO-3: + parameters
])
def test_zero_stages_over_fsdp8(full, zero, param_div, grad_div, opt_div):
  params, grads, moments = _measure({"fsdp": 8}, zero)
  assert params * param_div == full
  assert grads * grad_div == full
  assert moments * opt_div == 2 * full


def test_hierarchical_shards_inside_fsdp_only(full):
  params, grads, moments = _measure({"data": 2, "fsdp": 4}, 3)
  assert (params * 4, grads * 4, moments * 4) == (full, full, 2 * full)


def test_tensor_parallel_splits_all_but_norms(full):
  params, grads, moments = _measure({"tensor": 8}, 0)
  norm_bytes = 4 * (2 * LAYERS * D + D)  # attn/mlp norm scales per layer + final norm, float32, replicated
  assert params == (full - norm_bytes) // 8 + norm_bytes
  assert grads == params and moments == 2 * params


def test_mixed_precision_zero1_shards_master_weights(full):
  """With bf16 compute, ZeRO-1/2 count the float32 masters as optimizer state: sharded 8 ways."""
  params, grads, moments = _measure({"fsdp": 8}, 1, dataclasses.replace(MODEL, compute_dtype="bfloat16"))
  assert (params * 8, grads, moments * 8) == (full, full, 2 * full)
