"""Low-communication training end to end: `train.py` with DiLoCo over replica=4 x fsdp=2 (ZeRO-3)
killed between two outer steps and resumed with identical losses, and one algorithm per code path
of the runner through the training loop over replica=2 x data=2 x tensor=2: an outer algorithm
with an all-reduce (DiLoCo), NoLoCo's ppermute, a per-step rule (1-bit Adam) and the zeroth-order
step. The others share those paths and are proven at the op level (Streaming DiLoCo, CO2 and
SparseLoCo in tests/parallel/test_lowcomm_outer.py, EControl in tests/parallel/test_econtrol.py);
their schedules of outer steps over the same run are checked here without training."""

import signal

import numpy as np
import pytest

import configs
from parallel.lowcomm import dispatch
from tests import runs
from tests.training.test_checkpoint import _wait_for
from training.loop import train

STEPS, H = 24, 4
DILOCO = runs.SMALL + ["mesh.replica=4", "mesh.data=1", "mesh.fsdp=2", "sharding.zero_stage=3",
                       "sharding.replica=diloco", f"lowcomm.inner_steps={H}", f"train.steps={STEPS}",
                       "checkpoint.every=6"]  # 6, 18: mid-round checkpoints (outer steps after 4, 8, ...)


def _losses(workdir) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in runs.records(workdir, "train")}


def test_diloco_sigkill_between_outer_steps_then_resume(tmp_path):
  reference = tmp_path / "reference"
  p = runs.train(reference, DILOCO)
  assert p.returncode == 0, p.stderr[-4000:]
  want = _losses(reference)
  assert sorted(want) == list(range(1, STEPS + 1))
  sent = {r["step"]: r["bytes_sent"] for r in runs.records(reference, "train")}
  assert all((sent[s] > 0) == (s % H == 0) for s in sent)

  workdir, log = tmp_path / "run", tmp_path / "killed.log"
  proc = runs.start(workdir, DILOCO, log)
  _wait_for(proc, lambda: any(s >= 6 for s in runs.complete_checkpoints(workdir)), "a checkpoint at step >= 6", log)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  resume_from = runs.complete_checkpoints(workdir)[-1]
  assert resume_from % H, "the checkpoint to resume from lies between two outer steps"
  p = runs.train(workdir, DILOCO)
  assert p.returncode == 0, p.stderr[-4000:]
  assert f"resumed from the checkpoint at step {resume_from}" in p.stderr
  got = _losses(workdir)
  np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)], [want[s] for s in range(1, STEPS + 1)], rtol=1e-6)


ALGORITHMS = {  # one row per code path of training/lowcomm.py
    "diloco": [],  # an outer algorithm with an all-reduce (as Streaming DiLoCo, CO2, SparseLoCo)
    "noloco": [],  # the ppermute to a peer
    "onebit_adam": ["lowcomm.freeze_step=4"],  # a per-step rule in place of AdamW (as EControl)
    "zeroth_order": ["lowcomm.zo_eps=1e-2", "lowcomm.zo_directions=2", "optimizer.learning_rate=1e-2"],
}
SAME_PATH = {  # the algorithms that share a row's path: their knobs in the same run
    "streaming_diloco": ["lowcomm.fragments=2", "lowcomm.delay=0", "lowcomm.quant_bits=4"],
    "co2": [],
    "sparseloco": ["lowcomm.topk_fraction=0.03", "lowcomm.quant_bits=2"],
}
OUTER_STEPS = {"co2": [3, 5, 7], "streaming_diloco": [2, 3, 4, 5, 6, 7, 8]}  # others: every inner_steps=2


def _config(name: str, knobs: list[str]):
  return configs.get_config("tiny", runs.SMALL + [
      "mesh.replica=2", "mesh.data=2", "mesh.tensor=2", f"sharding.replica={name}", "lowcomm.inner_steps=2",
      "train.steps=8", "checkpoint.enabled=false", "data.max_corpus_bytes=100000"] + knobs)


@pytest.mark.parametrize("name", list(SAME_PATH))
def test_outer_steps_of_the_algorithms_that_share_a_path(name):
  """The 1-based steps at which each sends (a non-empty `events`), over the rows' 8-step run."""
  cfg = _config(name, SAME_PATH[name])
  algo = dispatch.algorithm(name, cfg.lowcomm, cfg.model.n_layers, cfg.mesh.replica)
  assert [t + 1 for t in range(8) if any(algo.events(t))] == OUTER_STEPS.get(name, [2, 4, 6, 8])


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_each_algorithm_trains_with_data_and_tensor_inside_islands(name, tmp_path):
  cfg = _config(name, ALGORITHMS[name])
  result = train(cfg, str(tmp_path))
  records = runs.records(tmp_path, "train")
  losses = [r["loss"] for r in records]
  assert result["step"] == 8 and np.all(np.isfinite(losses))
  if name != "zeroth_order":  # two SPSA directions per replica move a model from scratch too slowly to see
    assert losses[-1] < losses[0]
  sent = [r["bytes_sent"] for r in records]
  outer_steps = [s for s, b in enumerate(sent, 1) if b > 0]
  every_step = name in ("onebit_adam", "zeroth_order")
  assert outer_steps == (list(range(1, 9)) if every_step else [2, 4, 6, 8])
  if name == "onebit_adam":  # compressed after the freeze step
    assert sent[-1] < sent[0] / 4
