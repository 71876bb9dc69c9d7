"""The experts' sharding fields: every bad value raises a ConfigError naming fields and values
before anything compiles (configs/validate/experts.py)."""

import pytest

from configs import ConfigError, get_config, validate

MOE: list[str] = []  # mesh.data=-1 fills the devices the row leaves


def _check(overrides, backend="cpu", n_devices=8):
  return validate(get_config("tiny_moe", overrides), n_devices, backend)


@pytest.mark.parametrize("overrides", [
    ["mesh.expert=8"],
    ["mesh.data=2", "mesh.expert=4"],
    ["mesh.expert=4", "mesh.tensor=2"],
    ["mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2", "sharding.zero_stage=3"],
    ["mesh.data=2", "mesh.seq=2", "mesh.expert=2", "sharding.attention=ring", "sharding.expert_axes=data,seq,expert"],
    ["mesh.expert=4", "mesh.data=2", "sharding.expert_chunks=2", "sharding.expert_dispatch=capacity"],
])
def test_good_layouts(overrides):
  _check(MOE + overrides)


def test_ragged_and_tokamax_on_gpu():
  _check(MOE + ["mesh.expert=8", "sharding.expert_all_to_all=ragged"], backend="gpu")


@pytest.mark.parametrize("overrides, pattern", [
    (["mesh.expert=8", "model.n_experts=12"], r"model.n_experts=12 is not divisible by the expert axes "
                                              r"sharding.expert_axes=\('expert',\) \(8 devices\)"),
    (["sharding.capacity_factor=0"], r"sharding.capacity_factor=0.0: must be > 0"),
    (["sharding.capacity_factor=-1.5"], r"sharding.capacity_factor=-1.5: must be > 0"),
    (["sharding.expert_chunks=0"], r"sharding.expert_chunks=0: must be >= 1"),
    (["mesh.expert=8", "sharding.expert_chunks=3"], r"sharding.expert_chunks=3: the 2048 tokens .* do not split into "
                                                    r"8 devices \(expert\) x 3 chunks"),
    (["sharding.expert_axes=expert,experts"],
     r"sharding.expert_axes=\('expert', 'experts'\): \['experts'\] are not mesh axes"),
    (["sharding.expert_tensor_axes=tensor,tensor"],
     r"sharding.expert_tensor_axes=\('tensor', 'tensor'\): an axis appears twice"),
    (["mesh.expert=4", "mesh.tensor=2", "sharding.expert_axes=expert,tensor"],
     r"sharding.expert_axes=\('expert', 'tensor'\), sharding.expert_tensor_axes=\('tensor',\): \['tensor'\] in both"),
    (["mesh.data=8", "sharding.expert_tensor_axes=data"],
     r"sharding.expert_tensor_axes=\('data',\): \['data'\] split the tokens"),
    (["mesh.expert=8", "sharding.expert_all_to_all=ragged"], r"sharding.expert_all_to_all='ragged' needs a GPU or TPU"),
    (["sharding.expert_all_to_all=nccl"], r"sharding.expert_all_to_all='nccl': choose one of"),
    (["sharding.expert_dispatch=sinkhorn"], r"sharding.expert_dispatch='sinkhorn': choose one of"),
    (["sharding.grouped_matmul=tokamax"], r"sharding.grouped_matmul='tokamax' needs a GPU and the tokamax package"),
    (["sharding.grouped_matmul=mgpu"], r"sharding.grouped_matmul='mgpu' needs a GPU of compute capability 9.x"),
    (["mesh.expert=8", "model.n_experts=0", "model.n_shared_experts=0", "model.moe_first_dense=0"],
     r"mesh.expert=8 needs a mixture-of-experts model"),
    (["mesh.expert=8", "sharding.expert_axes=data"],
     r"mesh.expert=8, but sharding.expert_axes=\('data',\) leaves the expert axis idle"),
    (["mesh.tensor=8", "model.expert_d_ff=132", "model.n_kv_heads=8"],
     r"model.expert_d_ff=132 is not divisible by the expert-tensor axes "
     r"sharding.expert_tensor_axes=\('tensor',\) \(8 devices\)"),
    (["mesh.fsdp=2", "mesh.expert=4", "sharding.zero_stage=1", "sharding.expert_axes=fsdp,expert"],
     r"sharding.expert_axes=\('fsdp', 'expert'\) includes fsdp, which sharding.zero_stage=1"),
])
def test_rejected(overrides, pattern):
  with pytest.raises(ConfigError, match=pattern):
    _check(MOE + overrides)
