"""The train step: the pure function equals the jitted one, and Megatron sequence parallelism is
really on (its collectives are in the compiled step) when the config asks for it."""

import re

import jax
import numpy as np
import pytest

import configs
from tests.reference import assert_close
from tests.training.common import MODEL, packed_batch
from training.state import init_state, setup_from_config
from training.step import make_train_step, make_train_step_fn


def _collectives(hlo: str) -> dict[str, int]:
  ops = ("all-reduce", "reduce-scatter", "all-gather")
  return {op: len(re.findall(rf"= \S+ {op}(?:-start)?\(", hlo)) for op in ops}


def _compiled_step(*overrides: str) -> dict[str, int]:
  setup = setup_from_config(configs.get_config("tiny", MODEL + ["model.n_heads=8", "model.n_kv_heads=8", *overrides]))
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=setup.batch_sharding)
           for k, v in packed_batch(np.random.default_rng(0), 64, 1.0).items()}
  return _collectives(make_train_step(setup).lower(setup.abstract_state, batch).compile().as_text())


@pytest.mark.parametrize("sp", [True, False])
def test_sequence_parallel_reduce_scatters_the_residual_stream(sp):
  """With SP the row-parallel outputs are reduce-scattered on length and all-gathered before the
  next column-parallel matmul; without it, every combine is an all-reduce."""
  ops = _compiled_step("mesh.data=1", "mesh.tensor=8", f"sharding.sequence_parallel={sp}")
  if sp:
    assert ops["reduce-scatter"] >= 1 and ops["all-gather"] >= 2, ops
  else:
    assert ops["reduce-scatter"] == 0 and ops["all-gather"] == 0, ops


def test_pure_step_function_equals_the_jitted_step():
  """What an outer optimizer runs (the pure function, under its own jit) is the jitted step."""
  setup = setup_from_config(configs.get_config("tiny", MODEL + ["mesh.data=2", "mesh.fsdp=4", "sharding.zero_stage=2"]))
  batch = jax.device_put(packed_batch(np.random.default_rng(3), 64, 0.9), setup.batch_sharding)
  pure = jax.jit(make_train_step_fn(setup))
  want_state, want_metrics = pure(init_state(setup), batch)
  state, metrics = make_train_step(setup)(init_state(setup), batch)
  assert_close(jax.device_get(state), jax.device_get(want_state), what="state")
  assert_close(jax.device_get(metrics), jax.device_get(want_metrics), what="metrics")
