"""Every rule a configuration must obey, checked in one place before anything is built or compiled.

Each failure raises `ConfigError` naming the field(s), the value(s) and the rule that was broken.
"""

from __future__ import annotations

import math

from configs.base import MESH_AXES, Config, MeshConfig
from configs.overrides import ConfigError

_REMAT = ("none", "full", "dots", "dots_no_batch", "dots_and_attention")
_ATTENTION = ("auto", "xla", "cudnn")
_DTYPES = ("float32", "bfloat16")
_SOURCES = ("builtin", "text", "tokens", "synthetic")
_NOT_YET = ("stage", "seq", "expert")  # axes whose parallel ops are not built yet


def resolve_mesh_sizes(mesh: MeshConfig, n_devices: int) -> dict[str, int]:
  """Fills the one `-1` axis so that the product of all axes equals `n_devices`."""
  sizes = mesh.sizes()
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ConfigError(f"mesh.{axis}={size}: axis sizes must be positive, or -1 to fill")
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ConfigError(f"mesh: only one axis may be -1, got {', '.join('mesh.' + a for a in fill)}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if n_devices % known:
      raise ConfigError(f"mesh: the fixed axes multiply to {known}, which does not divide the "
                        f"{n_devices} devices, so mesh.{fill[0]}=-1 cannot fill them")
    sizes[fill[0]] = n_devices // known
  elif known != n_devices:
    shown = " x ".join(f"{a}={s}" for a, s in sizes.items() if s != 1) or "all 1"
    raise ConfigError(f"mesh: product of axis sizes ({shown}) is {known}, but there are {n_devices} devices")
  return sizes


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def validate(config: Config, n_devices: int) -> dict[str, int]:
  """Checks every section; returns the resolved mesh sizes."""
  m, d, s, o, t, c = (config.model, config.data, config.sharding, config.optimizer, config.train,
                      config.checkpoint)
  sizes = resolve_mesh_sizes(config.mesh, n_devices)
  for axis in _NOT_YET:
    _require(sizes[axis] == 1, f"mesh.{axis}={sizes[axis]}: {axis} parallelism is not available yet; "
                               f"use size 1")

  # Model shape.
  for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
    _require(getattr(m, name) > 0, f"model.{name}={getattr(m, name)}: must be positive")
  _require(m.head_dim > 0 or m.d_model % m.n_heads == 0,
           f"model.d_model={m.d_model}, model.n_heads={m.n_heads}: d_model must be divisible by "
           f"n_heads when model.head_dim=0")
  _require(m.n_heads % m.n_kv_heads == 0,
           f"model.n_heads={m.n_heads}, model.n_kv_heads={m.n_kv_heads}: n_heads must be a multiple "
           f"of n_kv_heads (grouped-query attention)")
  _require(m.resolved_head_dim % 2 == 0, f"model.head_dim={m.resolved_head_dim}: RoPE needs an even head_dim")
  _require(m.remat in _REMAT, f"model.remat={m.remat!r}: choose one of {_REMAT}")
  _require(m.attention_impl in _ATTENTION, f"model.attention_impl={m.attention_impl!r}: choose one of {_ATTENTION}")
  for name in ("param_dtype", "compute_dtype"):
    _require(getattr(m, name) in _DTYPES, f"model.{name}={getattr(m, name)!r}: choose one of {_DTYPES}")
  _require(m.attention_impl != "cudnn" or m.compute_dtype == "bfloat16",
           f"model.attention_impl='cudnn' needs model.compute_dtype='bfloat16' (got {m.compute_dtype!r}): "
           f"cuDNN flash attention has no float32 kernels")
  _require(1 <= m.scan_unroll <= m.n_layers and m.n_layers % m.scan_unroll == 0,
           f"model.scan_unroll={m.scan_unroll}: must divide model.n_layers={m.n_layers}")
  _require(m.rope_theta > 0, f"model.rope_theta={m.rope_theta}: must be positive")
  _require(m.rope_scaling_factor >= 1.0, f"model.rope_scaling_factor={m.rope_scaling_factor}: must be >= 1")

  # Tensor parallelism divides heads, KV heads, the MLP and (vocab-parallel) the vocabulary.
  tp = sizes["tensor"]
  for name in ("n_heads", "n_kv_heads", "d_ff"):
    _require(getattr(m, name) % tp == 0,
             f"model.{name}={getattr(m, name)} is not divisible by mesh.tensor={tp}")
  if s.vocab_parallel:
    _require(m.vocab_size % tp == 0, f"model.vocab_size={m.vocab_size} is not divisible by mesh.tensor={tp} "
                                     f"(sharding.vocab_parallel=true)")
  if s.sequence_parallel:
    _require(d.seq_len % tp == 0, f"data.seq_len={d.seq_len} is not divisible by mesh.tensor={tp} "
                                  f"(sharding.sequence_parallel=true)")

  # ZeRO shards parameters and optimizer state over `fsdp` on the embed dimension.
  _require(s.zero_stage in (0, 1, 2, 3), f"sharding.zero_stage={s.zero_stage}: choose 0, 1, 2 or 3")
  if s.zero_stage > 0:
    _require(m.d_model % sizes["fsdp"] == 0,
             f"model.d_model={m.d_model} is not divisible by mesh.fsdp={sizes['fsdp']} "
             f"(sharding.zero_stage={s.zero_stage} shards the embed dimension over fsdp)")

  # Batch and sequence.
  _require(d.seq_len > 0 and d.seq_len <= m.max_seq_len,
           f"data.seq_len={d.seq_len}: must be in 1..model.max_seq_len={m.max_seq_len}")
  _require(d.microbatches > 0, f"data.microbatches={d.microbatches}: must be positive")
  _require(d.global_batch % d.microbatches == 0,
           f"data.global_batch={d.global_batch} is not divisible by data.microbatches={d.microbatches}")
  batch_shards = sizes["replica"] * sizes["data"] * sizes["fsdp"]
  micro = d.global_batch // d.microbatches
  _require(micro % batch_shards == 0,
           f"data.global_batch={d.global_batch} / data.microbatches={d.microbatches} = {micro} rows per "
           f"microbatch is not divisible by the data axes replica*data*fsdp={batch_shards}")
  _require(d.source in _SOURCES, f"data.source={d.source!r}: choose one of {_SOURCES}")
  if d.source in ("text", "tokens"):
    _require(len(d.paths) > 0, f"data.paths is empty but data.source={d.source!r} needs files")
  _require(d.token_dtype in ("uint16", "uint32"), f"data.token_dtype={d.token_dtype!r}: choose uint16 or uint32")
  _require(0.0 <= d.val_fraction < 1.0, f"data.val_fraction={d.val_fraction}: must be in [0, 1)")

  # Optimizer and loop.
  _require(o.learning_rate > 0, f"optimizer.learning_rate={o.learning_rate}: must be positive")
  _require(0.0 <= o.min_lr_ratio <= 1.0, f"optimizer.min_lr_ratio={o.min_lr_ratio}: must be in [0, 1]")
  _require(o.warmup_steps >= 0, f"optimizer.warmup_steps={o.warmup_steps}: must be >= 0")
  _require(o.grad_clip >= 0, f"optimizer.grad_clip={o.grad_clip}: must be >= 0 (0 disables)")
  for name in ("steps", "log_every", "eval_every", "eval_batches"):
    _require(getattr(t, name) > 0, f"train.{name}={getattr(t, name)}: must be positive")
  _require(c.every > 0 and c.keep > 0, f"checkpoint.every={c.every}, checkpoint.keep={c.keep}: must be positive")
  return sizes


__all__ = ["MESH_AXES", "resolve_mesh_sizes", "validate"]
