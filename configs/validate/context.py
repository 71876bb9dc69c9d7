"""Context parallelism: the attention method over `seq`, its token layout and head counts."""

from __future__ import annotations

from configs.base import ATTENTION_METHODS, CONTEXT_LAYOUTS, Config
from configs.validate.require import require, require_choice


def check(config: Config, sizes: dict[str, int]) -> None:
  m, d, s = config.model, config.data, config.sharding
  seq, tp = sizes["seq"], sizes["tensor"]
  require_choice(s.attention, ATTENTION_METHODS, "sharding.attention")
  require_choice(s.context_layout, CONTEXT_LAYOUTS, "sharding.context_layout")
  require(seq == 1 or s.attention != "dense",
          f"mesh.seq={seq} needs a context-parallel sharding.attention (one of {ATTENTION_METHODS[1:]}); "
          f"'dense' keeps the whole sequence on every device")
  linear = "L" in m.layer_pattern
  require(s.attention != "lasp2" or linear,
          f"sharding.attention='lasp2' needs linear-attention layers, but model.layer_pattern={m.layer_pattern!r} "
          f"has none (use L, e.g. 'LLS')")
  if s.attention == "dense" or seq == 1:
    return
  require(not linear or s.context_layout != "striped" or s.attention == "ulysses",
          f"model.layer_pattern={m.layer_pattern!r} has linear layers, which LASP-2 runs over seq in contiguous "
          f"stretches; sharding.context_layout='striped' interleaves tokens (use zigzag or contiguous)")
  layout = "contiguous" if s.attention == "ulysses" else s.context_layout
  parts = seq * (2 if layout == "zigzag" else 1)
  require(d.seq_len % parts == 0,
          f"data.seq_len={d.seq_len} is not divisible by {'2 x ' if layout == 'zigzag' else ''}mesh.seq={seq} "
          f"(sharding.attention={s.attention!r}, {layout} layout: {parts} equal parts)")
  heads = m.n_heads // tp if m.n_heads % tp == 0 else m.n_heads
  if s.attention == "ulysses":
    require(heads % seq == 0, f"model.n_heads={m.n_heads} / mesh.tensor={tp} = {heads} heads per device is not "
                              f"divisible by mesh.seq={seq} (sharding.attention='ulysses' splits heads over seq)")
  if s.attention == "usp":
    u = s.ulysses_degree
    require(u >= 1 and seq % u == 0, f"sharding.ulysses_degree={u} does not divide mesh.seq={seq} (USP: "
                                     f"ulysses degree x ring degree = mesh.seq)")
    require(heads % u == 0, f"model.n_heads={m.n_heads} / mesh.tensor={tp} = {heads} heads per device is not "
                            f"divisible by sharding.ulysses_degree={u} (sharding.attention='usp')")
