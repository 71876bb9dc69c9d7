"""Batch and sequence shapes against the mesh, and the data source's settings."""

from __future__ import annotations

import math

from configs.base import BATCH_MESH_AXES, DATA_SOURCES, Config
from configs.validate.require import require, require_choice


def check(config: Config, sizes: dict[str, int]) -> None:
  m, d = config.model, config.data
  require(0 < d.seq_len <= m.max_seq_len, f"data.seq_len={d.seq_len}: must be in 1..model.max_seq_len={m.max_seq_len}")
  require(d.global_batch > 0, f"data.global_batch={d.global_batch}: must be positive")
  require(d.microbatches > 0, f"data.microbatches={d.microbatches}: must be positive")
  require(d.global_batch % d.microbatches == 0,
          f"data.global_batch={d.global_batch} is not divisible by data.microbatches={d.microbatches}")
  batch_shards = math.prod(sizes[a] for a in BATCH_MESH_AXES)
  micro = d.global_batch // d.microbatches
  require(micro % batch_shards == 0,
          f"data.global_batch={d.global_batch} / data.microbatches={d.microbatches} = {micro} rows per "
          f"microbatch is not divisible by the data axes {'*'.join(BATCH_MESH_AXES)}={batch_shards}")
  require_choice(d.source, DATA_SOURCES, "data.source")
  if d.source in ("text", "tokens"):
    require(len(d.paths) > 0, f"data.paths is empty but data.source={d.source!r} needs files")
  require(d.token_dtype in ("uint16", "uint32"), f"data.token_dtype={d.token_dtype!r}: choose uint16 or uint32")
  require(0.0 <= d.val_fraction < 1.0, f"data.val_fraction={d.val_fraction}: must be in [0, 1)")
  require(d.max_corpus_bytes > 0, f"data.max_corpus_bytes={d.max_corpus_bytes}: must be positive")
