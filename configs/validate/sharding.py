"""Tensor parallelism, ZeRO and the plan's named strategies, against the model and the mesh."""

from __future__ import annotations

from configs.base import REPLICA_ALGORITHMS, Config
from configs.validate.require import require, require_choice


def check(config: Config, sizes: dict[str, int]) -> None:
  m, d, s = config.model, config.data, config.sharding
  # Megatron tensor parallelism divides heads, KV heads, the MLP and (vocab-parallel) the vocabulary.
  tp = sizes["tensor"]
  for name in ("n_heads", "n_kv_heads", "d_ff"):
    require(getattr(m, name) % tp == 0, f"model.{name}={getattr(m, name)} is not divisible by mesh.tensor={tp}")
  if s.vocab_parallel:
    require(m.vocab_size % tp == 0, f"model.vocab_size={m.vocab_size} is not divisible by mesh.tensor={tp} "
                                    f"(sharding.vocab_parallel=true)")
  if s.sequence_parallel:
    seq = sizes["seq"]
    require(d.seq_len % (tp * seq) == 0,
            f"data.seq_len={d.seq_len} is not divisible by mesh.tensor={tp}" + (f" x mesh.seq={seq}" if seq > 1 else "")
            + " (sharding.sequence_parallel=true)")

  # ZeRO shards parameters and optimizer state over `fsdp` on the embed dimension.
  require(s.zero_stage in (0, 1, 2, 3), f"sharding.zero_stage={s.zero_stage}: choose 0, 1, 2 or 3")
  if s.zero_stage > 0:
    require(m.d_model % sizes["fsdp"] == 0,
            f"model.d_model={m.d_model} is not divisible by mesh.fsdp={sizes['fsdp']} "
            f"(sharding.zero_stage={s.zero_stage} shards the embed dimension over fsdp)")

  require_choice(s.replica, REPLICA_ALGORITHMS, "sharding.replica")
