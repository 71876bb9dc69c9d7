"""Whether a configuration's train step fits a device, from XLA's compiled memory analysis
(nothing runs): shared by `memory_fit.py` and `context_scaling.py`."""

from __future__ import annotations

import configs


def compiled_bytes(config: configs.Config) -> int:
  """Device bytes the compiled train step needs (XLA's estimate)."""
  import jax

  from training.state import setup_from_config
  from training.step import make_train_step

  setup = setup_from_config(config)
  shape = (config.data.global_batch, config.data.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, jax.numpy.int32) for k in
           ("inputs", "targets", "segment_ids", "positions")}
  batch["loss_mask"] = jax.ShapeDtypeStruct(shape, jax.numpy.float32)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=setup.batch_sharding) for k, v in batch.items()}
  m = make_train_step(setup).lower(setup.abstract_state, batch).compile().memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)


def fits(config: configs.Config, limit: int) -> tuple[bool, float | None, str]:
  """(fits, GiB needed or None, error name): a size XLA refuses to compile does not fit."""
  try:
    need = compiled_bytes(config)
  except Exception as err:  # noqa: BLE001
    return False, None, type(err).__name__
  return need <= limit, need / 2**30, ""


def _try(config_for, value: int, limit: int, tried: list[dict]) -> bool:
  """Whether `value`'s config fits; notes the attempt in `tried`."""
  ok, gib, error = fits(config_for(value), limit)
  tried.append({"value": value, "gib": gib, **({"error": error} if error else {})})
  return ok


def largest(config_for, values, limit: int) -> tuple[int | None, list[dict]]:
  """The largest of increasing `values` whose config fits, stopping at the first that does not."""
  best, tried = None, []
  for v in values:
    if not _try(config_for, v, limit, tried):
      break
    best = v
  return best, tried


def bisect(config_for, good: int, bad: int, step: int, limit: int, tried: list[dict]) -> int:
  """The largest multiple of `step` in [good, bad) that fits, given that `good` fits and `bad` does not."""
  while bad - good > step:
    mid = (good + bad) // 2 // step * step
    if mid <= good:
      break
    good, bad = (mid, bad) if _try(config_for, mid, limit, tried) else (good, mid)
  return good
