"""Pipeline parallelism: the schedule over `stage`, its microbatches and chunks, against the model."""

from __future__ import annotations

from configs.base import PIPELINE_SCHEDULES, Config
from configs.validate.require import require, require_choice


def chunks(config: Config) -> int:
  """Layer chunks per stage the schedule runs."""
  s = config.sharding
  return 2 if s.pipeline == "zb-v" else (s.virtual_stages if s.pipeline in ("circular", "interleaved") else 1)


def check(config: Config, sizes: dict[str, int]) -> None:
  m, d, s = config.model, config.data, config.sharding
  stages = sizes["stage"]
  require_choice(s.pipeline, PIPELINE_SCHEDULES, "sharding.pipeline")
  require(stages == 1 or s.pipeline != "none",
          f"mesh.stage={stages} needs a pipeline schedule: sharding.pipeline one of {PIPELINE_SCHEDULES[1:]}")
  if s.pipeline == "none":
    require(not s.pipeline_vocab_parallel, "sharding.pipeline_vocab_parallel=true needs a pipeline: set "
                                           f"sharding.pipeline (one of {PIPELINE_SCHEDULES[1:]})")
    return
  require(s.virtual_stages >= 1, f"sharding.virtual_stages={s.virtual_stages}: must be positive")
  c = chunks(config)
  require(m.n_layers % (stages * c) == 0,
          f"model.n_layers={m.n_layers} is not divisible by mesh.stage={stages} x {c} chunks per stage "
          f"(sharding.pipeline={s.pipeline!r}" + (f", sharding.virtual_stages={s.virtual_stages})" if c > 1 else ")"))
  require(d.microbatches >= stages,
          f"data.microbatches={d.microbatches} is fewer than mesh.stage={stages}: a pipeline needs at least one "
          f"microbatch per stage (sharding.pipeline={s.pipeline!r})")
  if s.pipeline == "interleaved":
    require(d.microbatches % stages == 0, f"data.microbatches={d.microbatches} is not a multiple of mesh.stage="
                                          f"{stages} (sharding.pipeline='interleaved' runs groups of one per stage)")
  if s.pipeline_vocab_parallel:
    split = stages * (sizes["tensor"] if s.vocab_parallel else 1)
    require(m.vocab_size % split == 0,
            f"model.vocab_size={m.vocab_size} is not divisible by mesh.stage={stages}"
            + (f" x mesh.tensor={sizes['tensor']}" if s.vocab_parallel else "")
            + " (sharding.pipeline_vocab_parallel=true splits the vocabulary over the stages)")
  for axis in ("seq", "expert"):
    require(sizes[axis] == 1, f"mesh.{axis}={sizes[axis]}: a pipeline composes with the batch axes and mesh.tensor "
                              f"only so far; "
                              f"{axis} x stage is not supported yet (sharding.pipeline={s.pipeline!r})")
  if m.n_experts:
    require(m.moe_first_dense == 0 and m.moe_every == 1,
            f"model.moe_first_dense={m.moe_first_dense}, model.moe_every={m.moe_every}: a pipeline splits one kind of "
            f"layer into stages; with experts every layer must be sparse (0 and 1) (sharding.pipeline={s.pipeline!r})")
  require(len(set(m.layer_pattern)) == 1, f"model.layer_pattern={m.layer_pattern!r}: a pipeline runs one kind of "
                                          f"attention per model (hybrid stacks are not split into stages yet)")
