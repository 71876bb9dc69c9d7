"""Training with experts: auxiliary-loss-free balancing lowers a skewed router's load imbalance, and
a run killed with SIGKILL resumes exactly, router biases included."""

import signal
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import configs
from configs import Config, DataConfig, MeshConfig, ModelConfig, OptimizerConfig, TrainConfig
from training.checkpoint import Checkpointer
from training.loop import train
from training.state import init_state, setup_from_config
from training.step import make_train_step
from tests import runs


def test_bias_balancing_lowers_load_imbalance():
  """A router skewed towards experts 0 and 1 for every token (a constant input channel they weigh
  heavily); the optimizer barely moves (tiny rate), so only the bias can rebalance."""
  steps, rate = 16, 0.02
  cfg = Config(model=ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=32,
                                 max_seq_len=16, n_experts=8, experts_top_k=2, expert_d_ff=16, router_score="sigmoid",
                                 bias_update_rate=rate),
               mesh=MeshConfig(data=1), data=DataConfig(seq_len=16, global_batch=8),
               optimizer=OptimizerConfig(learning_rate=1e-9, warmup_steps=0), train=TrainConfig(steps=steps))
  setup = setup_from_config(cfg, jax.devices()[:1])
  state = init_state(setup)
  rng = np.random.default_rng(0)
  embed = rng.normal(size=(64, 32)).astype(np.float32)
  embed[:, 0] = 3.0  # the same value for every token
  router = rng.normal(0, 0.3, (1, 32, 8)).astype(np.float32)  # [moe layers, D, E]
  router[0, 0, :2] = 2.0
  state["params"] = {**state["params"], "embed": jax.numpy.asarray(embed),
                     "moe_layers": {**state["params"]["moe_layers"],
                                    "mlp": {**state["params"]["moe_layers"]["mlp"], "router": jax.numpy.asarray(router)}}}
  tokens = rng.integers(0, 64, (8, 17)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((8, 16), np.int32),
           "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1)), "loss_mask": np.ones((8, 16), np.float32)}
  step = make_train_step(setup)
  imbalance = []
  for _ in range(steps):
    state, metrics = step(state, jax.device_put(batch, setup.batch_sharding))
    imbalance.append(float(metrics["load_imbalance"]))
  bias = np.asarray(state["router_bias"]["moe_layers"]["mlp"]["router_bias"][0])
  assert imbalance[0] > 3.0, imbalance  # skewed: most tokens pick experts 0 and 1 (4.0 at most)
  assert np.mean(imbalance[-4:]) < 0.6 * imbalance[0], imbalance
  assert bias[:2].max() < bias[2:].min(), bias  # the favoured experts were pushed down


# The killed and resumed train.py runs compile what the reference in this process compiled: they
# load it from the session's compilation cache.
pytestmark = pytest.mark.usefixtures("subprocesses_match_this_process")

STEPS, EVERY = 24, 4
RUN = runs.SMALL + ["model.n_experts=4", "model.experts_top_k=2", "model.expert_d_ff=32", "model.moe_first_dense=1",
                    "model.aux_loss_weight=0.01", "model.bias_update_rate=0.01", f"train.steps={STEPS}",
                    f"checkpoint.every={EVERY}", "checkpoint.keep=10"]


def _final_bias(workdir: Path) -> np.ndarray:
  cfg = configs.get_config("tiny", RUN)
  setup = setup_from_config(cfg)
  ckpt = Checkpointer(str(workdir / "checkpoints"), cfg.checkpoint)
  try:
    step, state, _ = ckpt.restore_latest(setup.abstract_state, cfg)
  finally:
    ckpt.close()
  assert step == STEPS
  return np.asarray(state["router_bias"]["moe_layers"]["mlp"]["router_bias"])


def test_sigkill_then_resume_restores_router_bias(tmp_path):
  reference = tmp_path / "reference"
  train(configs.get_config("tiny", RUN), str(reference))  # uninterrupted, in this process
  want = {r["step"]: r["loss"] for r in runs.records(reference, "train")}

  workdir, log = tmp_path / "run", tmp_path / "killed.log"
  proc = runs.start(workdir, RUN, log)
  deadline = time.monotonic() + runs.TIMEOUT
  while not any(s >= 8 for s in runs.complete_checkpoints(workdir)):
    assert proc.poll() is None, log.read_text()[-4000:]
    assert time.monotonic() < deadline, "timed out waiting for a checkpoint"
    time.sleep(0.005)
  if proc.poll() is not None:
    pytest.fail("training finished before it could be killed")
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL
  resume_from = runs.complete_checkpoints(workdir)[-1]
  assert resume_from < STEPS

  p = runs.train(workdir, RUN)
  assert p.returncode == 0, p.stderr[-4000:]
  assert f"resumed from the checkpoint at step {resume_from}" in p.stderr
  got = {r["step"]: r["loss"] for r in runs.records(workdir, "train")}
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)], [want[s] for s in range(1, STEPS + 1)], rtol=1e-6)
  bias, want_bias = _final_bias(workdir), _final_bias(reference)
  assert np.abs(want_bias).max() > 0  # the balancing really moved the biases
  np.testing.assert_array_equal(bias, want_bias)


def test_init_state_from_a_whole_variable_tree():
  """Parameters given with router biases inside (a model's whole tree, as `models.hf_moe.load_hf`
  returns): the biases go to the state's `router_bias`, the rest to `params`."""
  cfg = configs.get_config("tiny", ["model.n_experts=4", "model.moe_first_dense=1", "mesh.data=1"])
  setup = setup_from_config(cfg, jax.devices()[:1])
  fresh = init_state(setup)
  variables = jax.device_get(fresh["params"])
  variables["moe_layers"]["mlp"]["router_bias"] = np.full((1, 4), 0.5, np.float32)
  state = init_state(setup, variables)
  np.testing.assert_array_equal(state["router_bias"]["moe_layers"]["mlp"]["router_bias"], variables["moe_layers"]["mlp"]["router_bias"])
  assert "router_bias" not in state["params"]["moe_layers"]["mlp"]
  np.testing.assert_array_equal(state["params"]["moe_layers"]["mlp"]["router"], variables["moe_layers"]["mlp"]["router"])
  restarted = init_state(setup, jax.device_get(fresh["params"]))  # parameters alone: the biases start at zero
  assert not np.asarray(restarted["router_bias"]["moe_layers"]["mlp"]["router_bias"]).any()
