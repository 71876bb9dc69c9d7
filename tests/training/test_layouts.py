"""The same training steps give the same losses on one device and under every mesh layout."""

import dataclasses

import jax
import numpy as np
import pytest

from configs import Config, DataConfig, MeshConfig, ModelConfig, OptimizerConfig, ShardingConfig, TrainConfig
from training.state import init_state, setup_from_config
from training.step import make_train_step

STEPS = 5
MODEL = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=8, d_ff=128, max_seq_len=16)


def _config(mesh: dict, zero=0, sp=False, micro=1, model=MODEL, seq_len=16, **sharding) -> Config:
  return Config(model=model, mesh=MeshConfig(**{"data": 1, **mesh}),
                sharding=ShardingConfig(zero_stage=zero, sequence_parallel=sp, **sharding),
                data=DataConfig(seq_len=seq_len, global_batch=8, microbatches=micro),
                optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=2),
                train=TrainConfig(steps=STEPS))


def _batches(cfg: Config):
  """One fixed batch, repeated, so that a few steps visibly lower the loss."""
  rng = np.random.default_rng(0)
  b, l = cfg.data.global_batch, cfg.data.seq_len
  for _ in range(STEPS):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, (b, l + 1)).astype(np.int32)
    seg = np.where(np.arange(l)[None, :] < rng.integers(4, l, (b, 1)), 1, 2).astype(np.int32)
    first = np.argmax(seg == 2, axis=1)[:, None]
    pos = np.where(seg == 1, np.arange(l), np.arange(l) - first).astype(np.int32)
    yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg, "positions": pos,
           "loss_mask": (rng.random((b, l)) > 0.1).astype(np.float32)}


def _losses(cfg: Config) -> list[float]:
  n = int(np.prod(list(cfg.mesh.sizes().values())))
  setup = setup_from_config(cfg, jax.devices()[:n])
  state, step = init_state(setup), make_train_step(setup)
  out = []
  for batch in _batches(cfg):
    state, metrics = step(state, jax.device_put(batch, setup.batch_sharding))
    out.append(float(metrics["loss"]))
  return out


@pytest.fixture(scope="module")
def reference():
  return _losses(_config({}))


LAYOUTS = {
    "ddp8": _config({"data": 8}),
    "zero1_fsdp8": _config({"fsdp": 8}, zero=1),
    "zero2_fsdp8": _config({"fsdp": 8}, zero=2),
    "zero3_fsdp8": _config({"fsdp": 8}, zero=3),
    "hierarchical_data2_fsdp4": _config({"data": 2, "fsdp": 4}, zero=3),
    "data2_fsdp2_tensor2": _config({"data": 2, "fsdp": 2, "tensor": 2}, zero=3),
    "tensor8_sequence_parallel": _config({"tensor": 8}, sp=True),
    "zero2_data2_fsdp2_tensor2_microbatches2": _config({"data": 2, "fsdp": 2, "tensor": 2}, zero=2, micro=2),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_device(name, reference):
  losses = _losses(LAYOUTS[name])
  assert reference[-1] < reference[0]  # the steps really train
  np.testing.assert_allclose(losses, reference, rtol=1e-5)


BF16 = dataclasses.replace(MODEL, compute_dtype="bfloat16")


@pytest.fixture(scope="module")
def reference_bf16():
  return _losses(_config({}, model=BF16))


@pytest.mark.parametrize("mesh,zero", [({"fsdp": 8}, 1), ({"data": 2, "fsdp": 4}, 2), ({"fsdp": 8}, 3)])
def test_bfloat16_zero_matches_single_device(mesh, zero, reference_bf16):
  """Mixed precision: ZeRO-1/2 keep float32 masters sharded and gather bf16 copies each step."""
  losses = _losses(_config(mesh, zero=zero, model=BF16))
  assert reference_bf16[-1] < reference_bf16[0]
  np.testing.assert_allclose(losses, reference_bf16, rtol=2e-2)


# Context parallelism: 48 tokens (6 per device at seq=8), GQA with fewer key/value heads than
# sequence devices (Ulysses replicates them), documents packed two per row.
CONTEXT_MODEL = dataclasses.replace(MODEL, n_kv_heads=4, max_seq_len=48)
CONTEXT_MESHES = {"seq8": ({"seq": 8}, 0), "data2_seq4": ({"data": 2, "seq": 4}, 0),
                  "fsdp2_seq2_tensor2_zero3": ({"fsdp": 2, "seq": 2, "tensor": 2}, 3)}
CONTEXT_METHODS = {"allgather": {}, "ring": {}, "tokenring": {}, "ulysses": {}, "usp": {"ulysses_degree": 2},
                   "ring_striped": {"context_layout": "striped"}, "lasp2": {}}
# LASP-2 runs on a hybrid model: linear-attention layers (LASP-2) and softmax ones (all-gather-KV in
# LASP-2H, the ring otherwise).
HYBRID_MODEL = dataclasses.replace(CONTEXT_MODEL, layer_pattern="LS", linear_chunk=4)
MODELS = {"dense": CONTEXT_MODEL, "hybrid": HYBRID_MODEL}
# Every softmax method under every mesh; the striped ring (the others run zigzag) under seq8;
# LASP-2H under every mesh, and the ring with linear layers.
CONTEXT_ROWS = ([(m, mesh, "dense") for m in list(CONTEXT_METHODS)[:5] for mesh in CONTEXT_MESHES]
                + [("ring_striped", "seq8", "dense")] + [("lasp2", mesh, "hybrid") for mesh in CONTEXT_MESHES]
                + [("ring", "data2_seq4", "hybrid")])


@pytest.fixture(scope="module")
def context_reference():
  """One device's losses, per model, computed once."""
  cache = {}
  return lambda model: cache.setdefault(model, _losses(_config({}, model=MODELS[model], seq_len=48)))


@pytest.mark.parametrize("method,mesh,model", CONTEXT_ROWS)
def test_context_parallel_matches_single_device(method, mesh, model, context_reference):
  sizes, zero = CONTEXT_MESHES[mesh]
  losses = _losses(_config(sizes, zero=zero, model=MODELS[model], seq_len=48, attention=method.split("_")[0],
                           **CONTEXT_METHODS[method]))
  reference = context_reference(model)
  assert reference[-1] < reference[0]
  np.testing.assert_allclose(losses, reference, rtol=1e-5)


# Pipelines: 8 layers, every schedule (each also checked against the plain model at 2, 4 and 8
# stages in tests/parallel/test_pipeline_executor.py), with tensor, data and ZeRO-1/3 beside them.
PIPELINE_MODEL = dataclasses.replace(MODEL, n_layers=8)
PIPELINE_ROWS = {  # name -> (mesh, schedule, microbatches, virtual stages[, ZeRO stage])
    "gpipe_stage8_m8": ({"stage": 8}, "gpipe", 8, 1),
    "circular_stage2_tensor2_m4": ({"stage": 2, "tensor": 2}, "circular", 4, 2),
    "interleaved_stage2_fsdp4_zero3_m2": ({"stage": 2, "fsdp": 4}, "interleaved", 2, 2, 3),
    "1f1b_stage2_data2_tensor2_m4": ({"stage": 2, "data": 2, "tensor": 2}, "1f1b", 4, 1),
    "zb-h1_stage4_m4": ({"stage": 4}, "zb-h1", 4, 1),
    "zb-v_stage2_data2_fsdp2_zero1_m2": ({"stage": 2, "data": 2, "fsdp": 2}, "zb-v", 2, 1, 1),
}
# Vocabulary parallelism over the stages (embedding and output layer split on vocab).
VOCAB_ROWS = {  # name -> (mesh, schedule, microbatches, virtual stages, ZeRO stage, tied embeddings)
    "vocab_1f1b_stage4_tensor2_m4": ({"stage": 4, "tensor": 2}, "1f1b", 4, 1, 0, False),
    "vocab_zb-v_stage2_data2_tensor2_m2_tied": ({"stage": 2, "data": 2, "tensor": 2}, "zb-v", 2, 1, 0, True),
    "vocab_zb-h1_stage2_fsdp4_zero3_m2": ({"stage": 2, "fsdp": 4}, "zb-h1", 2, 1, 3, False),
}


@pytest.fixture(scope="module")
def reference_pipeline():
  return _losses(_config({}, model=PIPELINE_MODEL))


@pytest.mark.parametrize("name", list(PIPELINE_ROWS))
def test_pipeline_matches_single_device(name, reference_pipeline):
  mesh, schedule, micro, chunks, *zero = PIPELINE_ROWS[name]
  losses = _losses(_config(mesh, zero=zero[0] if zero else 0, model=PIPELINE_MODEL, micro=micro, pipeline=schedule,
                           virtual_stages=chunks))
  assert reference_pipeline[-1] < reference_pipeline[0]
  np.testing.assert_allclose(losses, reference_pipeline, rtol=1e-5)


@pytest.fixture(scope="module")
def reference_pipeline_tied():
  return _losses(_config({}, model=dataclasses.replace(PIPELINE_MODEL, tie_embeddings=True)))


@pytest.mark.parametrize("name", list(VOCAB_ROWS))
def test_pipeline_vocabulary_parallel_matches_single_device(name, reference_pipeline, reference_pipeline_tied):
  mesh, schedule, micro, chunks, zero, tied = VOCAB_ROWS[name]
  model = dataclasses.replace(PIPELINE_MODEL, tie_embeddings=tied)
  losses = _losses(_config(mesh, zero=zero, model=model, micro=micro, pipeline=schedule, virtual_stages=chunks,
                           pipeline_vocab_parallel=True))
  want = reference_pipeline_tied if tied else reference_pipeline
  assert want[-1] < want[0]
  np.testing.assert_allclose(losses, want, rtol=1e-5)


# Mixture of experts: a dense layer then an MoE layer (8 routed experts, top-2, a shared expert with
# Qwen2-MoE's gate), every router loss on and auxiliary-loss-free balancing updating the biases.
# Each row runs the expert-parallel dispatch (padded all-to-all on CPUs) of its plan.
MOE_MODEL = dataclasses.replace(MODEL, max_seq_len=32, n_experts=8, experts_top_k=2, expert_d_ff=32,
                                n_shared_experts=1, shared_expert_gate=True, moe_first_dense=1, aux_loss_weight=0.01,
                                seq_aux_loss_weight=0.01, z_loss_weight=1e-3, bias_update_rate=1e-2)
MOE_ROWS = {  # name -> (mesh, ZeRO stage, sharding fields, seq_len[, microbatches])
    # (Microbatched accumulation of the router losses and load: the pipeline rows' reference below.)
    "expert8": ({"expert": 8}, 0, {}, 16),
    "data2_expert4_chunks2": ({"data": 2, "expert": 4}, 0, {"expert_chunks": 2}, 16),
    "expert4_tensor2": ({"expert": 4, "tensor": 2}, 0, {}, 16),
    "fsdp2_expert2_tensor2_zero3": ({"fsdp": 2, "expert": 2, "tensor": 2}, 3, {}, 16),
    # MoE Parallel Folding: attention's ring over seq, the experts over data x seq x expert.
    "folded_data2_seq2_expert2_ring": ({"data": 2, "seq": 2, "expert": 2}, 0,
                                       {"attention": "ring", "expert_axes": ("data", "seq", "expert")}, 32),
}


@pytest.fixture(scope="module")
def moe_reference():
  cache = {}
  return lambda seq_len, micro: cache.setdefault(
      (seq_len, micro), _losses(_config({}, model=MOE_MODEL, seq_len=seq_len, micro=micro)))


@pytest.mark.parametrize("name", list(MOE_ROWS))
def test_experts_match_single_device(name, moe_reference):
  mesh, zero, sharding, seq_len, *micro = MOE_ROWS[name]
  micro = micro[0] if micro else 1
  losses = _losses(_config(mesh, zero=zero, model=MOE_MODEL, seq_len=seq_len, micro=micro, **sharding))
  reference = moe_reference(seq_len, micro)
  assert reference[-1] < reference[0]
  np.testing.assert_allclose(losses, reference, rtol=1e-5)


# Experts inside pipeline stages (every layer sparse). The router losses reach the objective through
# each part's backward, the load (for the bias update) comes out as the biases' gradient; with batch
# shards each shard's part sums the losses' statistics over the shards, so its router losses are
# the whole microbatch's, as on one device with the same microbatches.
MOE_PIPE_MODEL = dataclasses.replace(MOE_MODEL, n_layers=4, moe_first_dense=0)
MOE_PIPE_ROWS = {  # name -> (mesh, schedule, microbatches, sharding fields)
    "1f1b_stage2_m4": ({"stage": 2}, "1f1b", 4, {}),
    "zb-h1_stage2_m4": ({"stage": 2}, "zb-h1", 4, {}),
    "1f1b_stage2_data4_m2_experts_over_data": ({"stage": 2, "data": 4}, "1f1b", 2, {"expert_axes": ("data",)}),
}


@pytest.fixture(scope="module")
def moe_pipeline_reference():
  cache = {}
  return lambda micro: cache.setdefault(micro, _losses(_config({}, model=MOE_PIPE_MODEL, micro=micro)))


@pytest.mark.parametrize("name", list(MOE_PIPE_ROWS))
def test_experts_in_pipeline_match_single_device(name, moe_pipeline_reference):
  mesh, schedule, micro, sharding = MOE_PIPE_ROWS[name]
  losses = _losses(_config(mesh, model=MOE_PIPE_MODEL, micro=micro, pipeline=schedule, **sharding))
  reference = moe_pipeline_reference(micro)
  assert reference[-1] < reference[0]
  np.testing.assert_allclose(losses, reference, rtol=1e-5)
