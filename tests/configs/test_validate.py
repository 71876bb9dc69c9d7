"""Every configuration rule raises before compilation, naming the field, the value and the rule."""

import pytest

from configs import ConfigError, get_config, resolve_mesh_sizes, validate
from configs.base import MeshConfig


def _check(overrides, n_devices=8):
  return validate(get_config("tiny", overrides), n_devices, "cpu")


def test_presets_validate():
  assert _check([])["data"] == 8
  one_b = get_config("1b").model
  assert (one_b.d_model, one_b.n_layers, one_b.n_heads, one_b.n_kv_heads, one_b.d_ff, one_b.vocab_size,
          one_b.max_seq_len) == (2048, 16, 16, 8, 5632, 32000, 4096)
  validate(get_config("small", ["data.global_batch=8"]), 8, "cpu")
  validate(get_config("1b", ["model.attention_impl=cudnn"]), 1, "gpu")


def test_usp_takes_fewer_kv_heads_than_its_ulysses_degree():
  """USP repeats each key/value head up to lcm(K per device, ulysses degree) before its all-to-all
  (`ulysses.replicate_kv_heads`), so K only has to divide over mesh.tensor (a row below), as the
  op requires; the query heads per device must divide by the degree (a row below)."""
  usp = ["mesh.data=1", "sharding.attention=usp", "sharding.ulysses_degree=4", "model.n_kv_heads=2"]
  assert _check(usp + ["mesh.seq=8"])["seq"] == 8
  assert _check(usp + ["mesh.seq=4", "mesh.tensor=2"])["tensor"] == 2


def test_fill_axis():
  assert resolve_mesh_sizes(MeshConfig(data=2, fsdp=-1, tensor=2), 8)["fsdp"] == 2


@pytest.mark.parametrize("overrides,n,pattern", [
    (["mesh.data=2", "mesh.tensor=2"], 8, r"product of axis sizes \(data=2 x tensor=2\) is 4, but there are 8 devices"),
    (["mesh.data=-1", "mesh.fsdp=-1"], 8, r"only one axis may be -1.*mesh.data.*mesh.fsdp"),
    (["mesh.tensor=3"], 8, r"fixed axes multiply to 3, which does not divide the 8 devices"),
    (["mesh.data=0"], 8, r"mesh.data=0: axis sizes must be positive"),
    (["mesh.stage=2", "mesh.data=4"], 8, r"mesh.stage=2 needs a pipeline schedule: sharding.pipeline one of"),
    (["mesh.stage=2", "mesh.data=1", "mesh.seq=4", "sharding.attention=ring", "sharding.pipeline=1f1b",
      "data.microbatches=2"], 8, r"mesh.seq=4: a pipeline composes with the batch axes and mesh.tensor only so far"),
    (["mesh.stage=8", "mesh.data=1", "sharding.pipeline=1f1b", "data.microbatches=8"], 8,
     r"model.n_layers=2 is not divisible by mesh.stage=8 x 1 chunks per stage \(sharding.pipeline='1f1b'\)"),
    (["mesh.stage=2", "mesh.data=1", "mesh.tensor=4", "sharding.pipeline=1f1b", "data.microbatches=1"], 8,
     r"data.microbatches=1 is fewer than mesh.stage=2"),
    (["mesh.stage=2", "mesh.data=1", "mesh.tensor=4", "sharding.pipeline=interleaved", "sharding.virtual_stages=2",
      "model.n_layers=6", "data.microbatches=4"], 8,
     r"model.n_layers=6 is not divisible by mesh.stage=2 x 2 chunks per stage \(sharding.pipeline='interleaved', "
     r"sharding.virtual_stages=2\)"),
    (["mesh.stage=2", "mesh.data=1", "mesh.tensor=4", "sharding.pipeline=interleaved", "model.n_layers=4",
      "data.microbatches=3"], 8, r"data.microbatches=3 is not a multiple of mesh.stage=2"),
    (["sharding.pipeline_vocab_parallel=true"], 8, r"sharding.pipeline_vocab_parallel=true needs a pipeline"),
    (["mesh.stage=2", "mesh.data=1", "mesh.tensor=4", "sharding.pipeline=1f1b", "data.microbatches=2",
      "sharding.pipeline_vocab_parallel=true", "model.vocab_size=260"], 8,
     r"model.vocab_size=260 is not divisible by mesh.stage=2 x mesh.tensor=4 \(sharding.pipeline_vocab_parallel"),
    (["sharding.pipeline=pipedream"], 8, r"sharding.pipeline='pipedream': choose one of"),
    (["mesh.data=1", "mesh.tensor=8", "model.n_heads=4", "model.n_kv_heads=4"], 8,
     r"model.n_heads=4 is not divisible by mesh.tensor=8"),
    (["mesh.data=2", "mesh.tensor=4", "model.n_kv_heads=2"], 8, r"model.n_kv_heads=2 is not divisible by mesh.tensor=4"),
    (["model.n_heads=16", "model.n_kv_heads=3"], 8, r"model.n_heads=16, model.n_kv_heads=3: n_heads must be a multiple of n_kv_heads"),
    (["model.d_model=100", "model.n_heads=8"], 8, r"model.d_model=100, model.n_heads=8: d_model must be divisible"),
    (["mesh.data=2", "mesh.tensor=4", "model.vocab_size=510"], 8, r"model.vocab_size=510 is not divisible by mesh.tensor=4"),
    (["data.global_batch=12"], 8, r"data.global_batch=12 / data.microbatches=1 = 12 rows per microbatch is not divisible by the data axes replica\*data\*fsdp=8"),
    (["data.microbatches=3"], 8, r"data.global_batch=16 is not divisible by data.microbatches=3"),
    (["data.seq_len=256"], 8, r"data.seq_len=256: must be in 1..model.max_seq_len=128"),
    (["mesh.data=1", "mesh.fsdp=8", "sharding.zero_stage=3", "model.d_model=132", "model.n_heads=4", "model.head_dim=32"], 8,
     r"model.d_model=132 is not divisible by mesh.fsdp=8"),
    (["sharding.zero_stage=4"], 8, r"sharding.zero_stage=4: choose 0, 1, 2 or 3"),
    (["model.remat=sometimes"], 8, r"model.remat='sometimes': choose one of"),
    (["model.attention_impl=flash3"], 8, r"model.attention_impl='flash3': choose one of"),
    (["model.decode_attention=flash"], 8, r"model.decode_attention='flash': choose one of"),
    (["model.decode_split_k=3"], 8, r"model.decode_split_k=3: must be 0 \(auto\), or >= 1 and divide model.d_model"),
    (["model.decode_split_k=-1"], 8, r"model.decode_split_k=-1: must be 0 \(auto\)"),
    (["model.attention_impl=cudnn"], 8, r"model.attention_impl='cudnn' needs model.compute_dtype='bfloat16'"),
    (["model.attention_impl=cudnn", "model.compute_dtype=bfloat16"], 8,
     r"model.attention_impl='cudnn' needs an NVIDIA GPU, but this run's devices are 'cpu'"),
    (["optimizer.b1=1.0"], 8, r"optimizer.b1=1.0: Adam's decay rates must be in \[0, 1\)"),
    (["optimizer.b2=-0.1"], 8, r"optimizer.b2=-0.1: Adam's decay rates must be in \[0, 1\)"),
    (["optimizer.weight_decay=-0.01"], 8, r"optimizer.weight_decay=-0.01: must be >= 0"),
    (["sharding.attention=flash"], 8, r"sharding.attention='flash': choose one of \('dense', 'allgather'"),
    (["mesh.data=2", "mesh.seq=4"], 8, r"mesh.seq=4 needs a context-parallel sharding.attention"),
    (["mesh.data=2", "mesh.seq=4", "sharding.attention=ring", "data.seq_len=100"], 8,
     r"data.seq_len=100 is not divisible by 2 x mesh.seq=4 \(sharding.attention='ring', zigzag layout: 8 equal parts\)"),
    (["mesh.data=1", "mesh.seq=8", "sharding.attention=ring", "sharding.context_layout=striped", "data.seq_len=100"], 8,
     r"data.seq_len=100 is not divisible by mesh.seq=8 \(sharding.attention='ring', striped layout"),
    (["mesh.data=1", "mesh.seq=8", "sharding.attention=ring", "sharding.context_layout=spiral"], 8,
     r"sharding.context_layout='spiral': choose one of"),
    (["mesh.data=1", "mesh.seq=4", "mesh.tensor=2", "sharding.attention=ulysses", "model.n_heads=12", "model.head_dim=16"],
     8, r"model.n_heads=12 / mesh.tensor=2 = 6 heads per device is not divisible by mesh.seq=4 \(sharding.attention='ulysses'"),
    (["mesh.data=1", "mesh.seq=8", "sharding.attention=usp", "sharding.ulysses_degree=3"], 8,
     r"sharding.ulysses_degree=3 does not divide mesh.seq=8 \(USP: ulysses degree x ring degree = mesh.seq\)"),
    (["mesh.data=1", "mesh.seq=4", "mesh.tensor=2", "sharding.attention=usp", "sharding.ulysses_degree=4",
      "model.n_heads=12", "model.head_dim=16"], 8,
     r"model.n_heads=12 / mesh.tensor=2 = 6 heads per device is not divisible by sharding.ulysses_degree=4 "
     r"\(sharding.attention='usp'\)"),
    (["sharding.attention=lasp2"], 8, r"sharding.attention='lasp2' needs linear-attention layers, but "
                                      r"model.layer_pattern='S' has none"),
    (["model.layer_pattern=SLX"], 8, r"model.layer_pattern='SLX': use the letters S \(softmax\) and L"),
    (["model.layer_pattern=LLS"], 8, r"model.layer_pattern='LLS' \(3 layers\) does not repeat evenly over model.n_layers=2"),
    (["model.layer_pattern=LS", "mesh.data=1", "mesh.seq=8", "sharding.attention=ring",
      "sharding.context_layout=striped"], 8, r"has linear layers, which LASP-2 runs over seq in contiguous stretches"),
    (["mesh.data=2", "mesh.seq=2", "mesh.tensor=2", "sharding.attention=ring", "sharding.sequence_parallel=true",
      "data.seq_len=126"], 8, r"data.seq_len=126 is not divisible by mesh.tensor=2 x mesh.seq=2"),
    (["sharding.replica=gossip"], 8, r"sharding.replica='gossip': choose one of"),
    (["sharding.replica=diloco"], 8, r"sharding.replica='diloco' needs islands to average over, but mesh.replica=1"),
    (["mesh.replica=2", "mesh.data=4", "model.n_experts=4", "sharding.replica=diloco"], 8,
     r"sharding.replica='diloco' with model.n_experts=4: experts inside an island are not supported by the replica runner yet"),
    (["mesh.replica=2", "mesh.stage=2", "mesh.data=2", "sharding.pipeline=1f1b", "data.microbatches=2",
      "sharding.replica=diloco"], 8, r"sharding.replica='diloco' with mesh.stage=2: a pipeline inside an island"),
    (["mesh.replica=2", "mesh.seq=2", "mesh.data=2", "sharding.attention=ring", "sharding.replica=noloco"], 8,
     r"sharding.replica='noloco' with mesh.seq=2: context parallelism inside an island is not supported yet"),
    (["mesh.replica=2", "mesh.data=4", "sharding.replica=streaming_diloco", "lowcomm.fragments=3"], 8,
     r"lowcomm.fragments=3: must be in 1..model.n_layers=2"),
    (["mesh.replica=2", "mesh.data=4", "sharding.replica=streaming_diloco", "model.n_layers=4",
      "lowcomm.fragments=3"], 8, r"lowcomm.fragments=3 does not divide model.n_layers=4"),
    (["mesh.replica=2", "mesh.data=4", "sharding.replica=streaming_diloco", "lowcomm.inner_steps=4",
      "lowcomm.fragments=2", "lowcomm.delay=4"], 8, r"lowcomm.delay=4: tau must be in 0..lowcomm.inner_steps-1=3"),
    (["mesh.replica=2", "mesh.data=4", "sharding.replica=streaming_diloco", "lowcomm.fragments=2",
      "lowcomm.quant_bits=3"], 8,
     r"lowcomm.quant_bits=3: choose one of \(0, 2, 4, 8\)"),
    (["mesh.replica=2", "mesh.data=4", "sharding.replica=sparseloco", "lowcomm.topk_fraction=0"], 8,
     r"lowcomm.topk_fraction=0.0: must be in \(0, 1\]"),
    (["mesh.replica=2", "mesh.data=4", "sharding.replica=sparseloco", "lowcomm.topk_fraction=1.5"], 8,
     r"lowcomm.topk_fraction=1.5: must be in \(0, 1\]"),
    (["mesh.replica=3", "mesh.data=-1", "sharding.replica=noloco", "data.global_batch=12"], 6,
     r"sharding.replica='noloco' pairs islands: mesh.replica=3 must be even"),
    (["mesh.replica=2", "mesh.data=4", "sharding.replica=co2", "lowcomm.staleness_penalty=2"], 8,
     r"lowcomm.staleness_penalty=2.0: must be in \[0, 1\]"),
    (["mesh.replica=2", "mesh.data=4", "sharding.replica=onebit_adam", "lowcomm.freeze_step=0"], 8,
     r"lowcomm.freeze_step=0: must be >= 1"),
    (["mesh.replica=2", "mesh.data=4", "sharding.replica=econtrol", "lowcomm.econtrol_eta=-1"], 8,
     r"lowcomm.econtrol_eta=-1.0: must be positive"),
    (["mesh.replica=2", "mesh.data=4", "sharding.replica=zeroth_order", "lowcomm.zo_eps=0"], 8,
     r"lowcomm.zo_eps=0.0: must be positive"),
    (["mesh.replica=2", "mesh.data=4", "sharding.replica=zeroth_order", "lowcomm.zo_directions=0"], 8,
     r"lowcomm.zo_directions=0: must be >= 1"),
    (["mesh.replica=2", "mesh.data=4", "sharding.replica=diloco", "lowcomm.inner_steps=0"], 8,
     r"lowcomm.inner_steps=0: H must be >= 1"),
    (["mesh.replica=2", "mesh.data=4", "sharding.replica=diloco", "lowcomm.outer_lr=-0.1"], 8,
     r"lowcomm.outer_lr=-0.1: must be positive"),
    (["mesh.replica=2", "mesh.data=4", "sharding.replica=diloco", "lowcomm.outer_momentum=1.0"], 8,
     r"lowcomm.outer_momentum=1.0: must be in \[0, 1\)"),
    (["data.source=text"], 8, r"data.paths is empty but data.source='text' needs files"),
    (["data.source=web"], 8, r"data.source='web': choose one of"),
    (["optimizer.learning_rate=0"], 8, r"optimizer.learning_rate=0.0: must be positive"),
    (["train.steps=0"], 8, r"train.steps=0: must be positive"),
    (["mesh.data=2", "mesh.tensor=4", "sharding.sequence_parallel=true", "data.seq_len=126"], 8,
     r"data.seq_len=126 is not divisible by mesh.tensor=4 \(sharding.sequence_parallel=true\)"),
])
def test_rule_violations(overrides, n, pattern):
  with pytest.raises(ConfigError, match=pattern):
    _check(overrides, n)


MOE = ["model.n_experts=4", "model.experts_top_k=2"]


@pytest.mark.parametrize("overrides,pattern", [
    (["model.experts_top_k=5"], r"model.experts_top_k=5: must be between 1 and model.n_experts=4"),
    (["model.router_groups=3"], r"model.router_groups=3: must divide model.n_experts=4"),
    (["model.router_groups=2", "model.router_topk_groups=3"], r"model.router_topk_groups=3: must be between 1 and model.router_groups=2"),
    (["model.router_groups=4", "model.router_topk_groups=1"], r"model.experts_top_k=2 exceeds the 1 experts of the model.router_topk_groups=1"),
    (["model.bias_update_rate=-0.1"], r"model.bias_update_rate=-0.1: must be >= 0"),
    (["model.aux_loss_weight=-1"], r"model.aux_loss_weight=-1.0: must be >= 0"),
    (["model.z_loss_weight=-1"], r"model.z_loss_weight=-1.0: must be >= 0"),
    (["model.routed_scale=0"], r"model.routed_scale=0.0: must be positive"),
    (["model.moe_every=0"], r"model.moe_every=0: must be >= 1"),
    (["model.moe_first_dense=2"], r"model.moe_first_dense=2: must be between 0 and model.n_layers-1=1"),
    (["model.moe_every=3"], r"model.moe_first_dense=0, model.moe_every=3: no layer of model.n_layers=2 is sparse"),
    (["model.shared_expert_d_ff=64"], r"model.shared_expert_d_ff=64 is set but model.n_shared_experts=0"),
    (["model.shared_expert_gate=true"], r"model.shared_expert_gate=true needs shared experts"),
    (["model.router_score=relu"], r"model.router_score='relu': choose one of \('softmax', 'sigmoid'\)"),
    (["mesh.stage=2", "mesh.data=4", "sharding.pipeline=1f1b", "data.microbatches=2", "model.moe_every=2"],
     r"model.moe_first_dense=0, model.moe_every=2: a pipeline splits one kind of layer into stages"),
])
def test_expert_model_fields_rejected(overrides, pattern):
  with pytest.raises(ConfigError, match=pattern):
    _check(MOE + overrides)


def test_shared_experts_need_routed_experts():
  with pytest.raises(ConfigError, match=r"model.n_shared_experts=1 needs routed experts"):
    _check(["model.n_shared_experts=1"])


def test_expert_presets_validate():
  validate(get_config("tiny_moe"), 8, "cpu")
  m = get_config("moe").model
  assert (m.d_model, m.n_layers, m.n_experts, m.experts_top_k, m.expert_d_ff, m.n_shared_experts,
          m.shared_expert_d_ff, m.max_seq_len, m.compute_dtype) == (2048, 16, 16, 4, 1408, 2, 1408, 4096, "bfloat16")
  validate(get_config("moe"), 1, "gpu")
