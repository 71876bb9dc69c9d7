"""Checkpoints: exact resumption after SIGKILL and SIGTERM (one metrics record per step), restore
onto other meshes, params-only restore (evaluation, fine-tuning, Hugging Face export), a changed
model refused without touching anything, corrupt and unfinished saves.

One uninterrupted run (in this process, once per session: every xdist worker reads the same) is
the reference for all of them. Killed and stopped runs go through `train.py` as a user would start
them (tests/runs.py), at this process's matmul precision, so they load the reference's compiled
programs from the session's compilation cache. On CPU a run is bitwise reproducible, in a
subprocess or in this process.
"""

import json
import logging
import shutil
import signal
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import configs
from data import make_dataset
from models.hf_llama import load_hf_checkpoint, save_hf_checkpoint
from training.checkpoint import Checkpointer, CheckpointMismatch, restore_params
from training.loop import evaluate, train
from training.state import setup_from_config
from training.step import make_eval_step
from tests import runs

STEPS = 32  # steps are ~20 ms: long enough past the step-8 checkpoint that a kill lands mid-run
EVERY = 4
# keep=10 keeps every checkpoint of the reference run, so later tests can start from any of them.
RUN = runs.SMALL + [f"train.steps={STEPS}", f"checkpoint.every={EVERY}", "checkpoint.keep=10"]


# --- helpers ---------------------------------------------------------------------------------------

def _run(workdir: Path) -> str:
  """Runs train.py on `workdir` to completion; returns its output."""
  p = runs.train(workdir, RUN)
  assert p.returncode == 0, f"train.py exited with {p.returncode}:\n{p.stderr[-4000:]}"
  return p.stderr


def _wait_for(proc, ready, what: str, log: Path) -> None:
  deadline = time.monotonic() + runs.TIMEOUT
  while not ready():
    if proc.poll() is not None:
      pytest.fail(f"training exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
    if time.monotonic() > deadline:
      proc.kill()
      proc.wait()
      pytest.fail(f"timed out waiting for {what}")
    time.sleep(0.005)


def _losses(workdir: Path) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in runs.records(workdir, "train")}


def _assert_one_record_per_step(workdir: Path) -> None:
  steps = [r["step"] for r in runs.records(workdir, "train")]
  assert steps == list(range(1, STEPS + 1)), steps


def _assert_same_losses(got: dict[int, float], want: dict[int, float], steps) -> None:
  steps = list(steps)
  assert all(s in got for s in steps), (sorted(got), steps)
  np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=1e-6)


def _config(*extra: str) -> configs.Config:
  """The reference run's config (plus overrides), for runs and restores in this process."""
  return configs.get_config("tiny", RUN + list(extra))


def _workdir_with(reference: Path, steps, dst: Path) -> Path:
  """A fresh workdir holding copies of some of the reference run's checkpoints."""
  (dst / "checkpoints").mkdir(parents=True)
  for s in steps:
    shutil.copytree(reference / "checkpoints" / str(s), dst / "checkpoints" / str(s))
  return dst


def _eval_loss(setup, params, cfg) -> float:
  val = make_dataset(cfg.data, vocab_size=cfg.model.vocab_size, split="validation")
  return evaluate(setup, make_eval_step(setup), params, val, cfg.train.eval_batches)


pytestmark = pytest.mark.usefixtures("subprocesses_match_this_process")


@pytest.fixture(scope="module")
def reference(shared_once) -> Path:
  """The workdir of one uninterrupted run, with checkpoints at every EVERY steps (read only)."""
  workdir = shared_once("checkpoint-reference", lambda workdir: train(_config(), str(workdir)))
  _assert_one_record_per_step(workdir)
  assert runs.complete_checkpoints(workdir) == list(range(EVERY, STEPS + 1, EVERY))
  return workdir


@pytest.fixture(scope="module")
def trained_eval(reference) -> float:
  """The eval loss the reference run logged at its last step (mesh data=8, ZeRO 0)."""
  saved = json.loads((reference / "config.json").read_text())
  assert saved["mesh"]["data"] == -1 and saved["sharding"]["zero_stage"] == 0
  (loss,) = [r["loss"] for r in runs.records(reference, "eval") if r["step"] == STEPS]
  return loss


# --- killed and stopped runs -----------------------------------------------------------------------

def test_sigterm_then_sigkill_then_resume_reproduce_the_uninterrupted_losses(reference, tmp_path):
  """One workdir, three `train.py` runs: SIGTERM stops the first, which saves where it stopped and
  exits cleanly; the second resumes from there and is killed with SIGKILL after a later
  checkpoint; the third resumes from that one and finishes. Every step's loss equals the
  uninterrupted run's (the second run's steps up to its checkpoint included), with one metrics
  record per step: the steps the killed run logged past its checkpoint were recomputed."""
  workdir = tmp_path / "run"

  # SIGTERM: a checkpoint at the step it stopped at, and exit status 0.
  log = tmp_path / "stopped.log"
  proc = runs.start(workdir, RUN, log)
  # Step 6 is logged inside the loop, so the SIGTERM handler is installed by then.
  _wait_for(proc, lambda: any(r["step"] >= 6 for r in runs.records(workdir)), "step 6", log)
  assert proc.poll() is None, "training finished before it could be stopped"
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0, log.read_text()[-4000:]

  stopped = max(_losses(workdir))
  assert 6 <= stopped < STEPS
  assert f"received signal {int(signal.SIGTERM)}: saved step {stopped}, stopping" in log.read_text()
  steps = runs.complete_checkpoints(workdir)
  # A checkpoint at the step it stopped at, not only the last periodic one before it.
  assert steps[-1] == stopped, steps
  assert stopped // EVERY * EVERY in steps

  # Resumed from there; SIGKILL once it has saved a checkpoint (at step 8 or later) of its own.
  log = tmp_path / "killed.log"
  proc = runs.start(workdir, RUN, log)
  _wait_for(proc, lambda: any(s >= 8 and s > stopped for s in runs.complete_checkpoints(workdir)),
            "a checkpoint at step >= 8 after the stopped step", log)
  assert proc.poll() is None, "training finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL
  assert f"resumed from the checkpoint at step {stopped}" in log.read_text(), log.read_text()[-4000:]

  resume_from = runs.complete_checkpoints(workdir)[-1]
  killed_at = max(_losses(workdir))
  assert stopped < resume_from and 8 <= resume_from < STEPS and killed_at < STEPS, (stopped, resume_from, killed_at)

  out = _run(workdir)
  assert f"resumed from the checkpoint at step {resume_from}" in out, out[-4000:]
  # The steps the killed run logged past its checkpoint were recomputed: one record each.
  _assert_one_record_per_step(workdir)
  _assert_same_losses(_losses(workdir), _losses(reference), range(1, STEPS + 1))
  assert runs.complete_checkpoints(workdir)[-1] == STEPS
  assert "Traceback" not in out, out[-4000:]


def test_finished_run_is_resumed_and_stops_at_once(reference, tmp_path):
  """Re-running the quick-start command on a finished workdir resumes it and trains nothing."""
  workdir = _workdir_with(reference, [STEPS], tmp_path / "run")
  (workdir / "metrics.jsonl").write_text((reference / "metrics.jsonl").read_text())
  cfg = _config()
  result = train(cfg, str(workdir))
  assert result["step"] == STEPS
  _assert_one_record_per_step(workdir)


# --- restores in this process: other meshes, params only, changed configs ---------------------------

def _restore(ckpt_dir: Path, cfg: configs.Config, n_devices: int):
  """Restores the newest checkpoint into `cfg`'s layout on the first `n_devices` devices."""
  devices = jax.devices()[:n_devices]
  setup = setup_from_config(cfg, devices)
  ckpt = Checkpointer(str(ckpt_dir), cfg.checkpoint)
  try:
    step, state, _ = ckpt.restore_latest(setup.abstract_state, cfg)
  finally:
    ckpt.close()

  # Every restored array lives in the new layout, on the new devices.
  def check(x, want):
    assert x.sharding.spec == want.spec, (x.sharding.spec, want.spec)
    assert x.sharding.device_set == set(devices)
  jax.tree.map(check, state, setup.state_shardings)
  return setup, step, state


def test_restore_onto_other_meshes_gives_the_same_eval_loss(reference, trained_eval, tmp_path):
  ckpt_dir = _workdir_with(reference, [STEPS], tmp_path / "run") / "checkpoints"
  cfg = _config()
  setup, step, state = _restore(ckpt_dir, cfg, 8)
  assert step == STEPS and int(state["step"]) == STEPS
  np.testing.assert_allclose(_eval_loss(setup, state["params"], cfg), trained_eval, rtol=1e-5)

  # ZeRO-3 over fsdp=4 on half the devices: parameters and moments sharded on `embed`.
  fsdp = configs.apply_overrides(cfg, ["mesh.data=1", "mesh.fsdp=4", "sharding.zero_stage=3"])
  setup, step, state = _restore(ckpt_dir, fsdp, 4)
  embed = state["params"]["embed"]  # [vocab, embed]
  assert embed.sharding.spec == P(None, "fsdp")
  assert {sh.data.shape for sh in embed.addressable_shards} == {(264, 64 // 4)}
  assert state["params"]["layers"]["attn"]["wq"].sharding.spec == P(None, "fsdp", None, None)
  np.testing.assert_allclose(_eval_loss(setup, state["params"], fsdp), trained_eval, rtol=1e-5)

  # Megatron tensor=2 x data=4 on all 8 devices: heads and vocabulary split over `tensor`.
  tp = configs.apply_overrides(cfg, ["mesh.data=4", "mesh.tensor=2"])
  setup, step, state = _restore(ckpt_dir, tp, 8)
  assert state["params"]["embed"].sharding.spec == P("tensor", None)
  assert {sh.data.shape for sh in state["params"]["embed"].addressable_shards} == {(264 // 2, 64)}
  assert state["params"]["layers"]["attn"]["wq"].sharding.spec == P(None, None, "tensor", None)
  np.testing.assert_allclose(_eval_loss(setup, state["params"], tp), trained_eval, rtol=1e-5)


def test_params_only_restore_evaluates_and_exports(reference, trained_eval, tmp_path):
  """Just the parameters, onto tensor=2 x data=4, from the workdir: same eval loss, and the same
  weights after a round trip through a Hugging Face checkpoint directory."""
  cfg = _config("mesh.data=4", "mesh.tensor=2")
  setup = setup_from_config(cfg)
  step, params = restore_params(str(reference), setup.abstract_state["params"], cfg)
  assert step == STEPS
  assert params["layers"]["mlp"]["w_up"].sharding.spec == P(None, None, "tensor")
  np.testing.assert_allclose(_eval_loss(setup, params, cfg), trained_eval, rtol=1e-5)

  save_hf_checkpoint(tmp_path / "hf", cfg.model, jax.device_get(params))
  model_cfg, hf_params = load_hf_checkpoint(tmp_path / "hf")
  assert (model_cfg.d_model, model_cfg.vocab_size, model_cfg.n_kv_heads) == (64, 264, 2)
  jax.tree.map(np.testing.assert_array_equal, hf_params, jax.device_get(params))


def test_init_params_from_fine_tunes_from_another_run(reference, tmp_path):
  """A new workdir started from the reference's parameters: step 0, a fresh optimizer, and the
  first loss that of the reference's weights on the first batch (below a random init's)."""
  cfg = _config("train.steps=2", f"checkpoint.init_params_from={reference}", "checkpoint.enabled=false")
  result = train(cfg, str(tmp_path / "tuned"))
  assert result["step"] == 2
  first = runs.records(tmp_path / "tuned", "train")[0]["loss"]
  assert first < _losses(reference)[1] - 1.0, (first, _losses(reference)[1])


def test_changed_model_is_refused_and_nothing_is_touched(reference, tmp_path):
  workdir = _workdir_with(reference, [28, 32], tmp_path / "run")
  (workdir / "metrics.jsonl").write_text((reference / "metrics.jsonl").read_text())
  before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  with pytest.raises(CheckpointMismatch, match=r"step 32 .*model.d_model=64 in the checkpoint, 128 now.*"
                                               r"model.d_ff=128 in the checkpoint, 256 now"):
    train(_config("model.d_model=128", "model.d_ff=256"), str(workdir))
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before
  assert (workdir / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
  with pytest.raises(CheckpointMismatch, match=r"model.n_layers=2 in the checkpoint, 3 now"):
    cfg = _config("model.n_layers=3")
    restore_params(str(workdir), setup_from_config(cfg).abstract_state["params"], cfg)


# --- unfinished and corrupt checkpoints -------------------------------------------------------------

def test_unfinished_save_is_ignored(reference, tmp_path):
  workdir = _workdir_with(reference, [4, 8], tmp_path / "run")
  ckpt_dir = workdir / "checkpoints"
  # What a run killed mid-save leaves behind: a newer step under Orbax's temporary name, with
  # garbage where the arrays would be (the current naming `<step>.orbax-checkpoint-tmp`, and the
  # older one with a timestamp suffix).
  for name in ("12.orbax-checkpoint-tmp", "16.orbax-checkpoint-tmp-1700000000000"):
    partial = ckpt_dir / name / "state"
    partial.mkdir(parents=True)
    (partial / "_METADATA").write_text("{not json")
    (partial / "manifest.ocdbt").write_bytes(b"\0" * 10)
  cfg = _config()
  abstract = setup_from_config(cfg).abstract_state

  ckpt = Checkpointer(str(ckpt_dir), cfg.checkpoint)
  try:
    assert sorted(ckpt.manager.all_steps()) == [4, 8]
    step, state, data_state = ckpt.restore_latest(abstract, cfg)
    assert step == 8 and int(state["step"]) == 8 and data_state == {"step": 8}
    # Saving the same step again goes through in spite of the leftover temporary directory.
    ckpt.save(12, state, {"step": 12}, cfg)
    ckpt.wait()
  finally:
    ckpt.close()
  assert runs.complete_checkpoints(workdir) == [4, 8, 12]

  ckpt = Checkpointer(str(ckpt_dir), cfg.checkpoint)
  try:
    step, again, data_state = ckpt.restore_latest(abstract, cfg)
  finally:
    ckpt.close()
  assert step == 12 and data_state == {"step": 12}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), again, state)


def test_corrupt_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, caplog):
  # A run that got as far as step 8, whose step-8 checkpoint then went bad.
  workdir = _workdir_with(reference, [4, 8], tmp_path / "run")
  # Orbax (OCDBT) keeps array bytes in content-addressed files under state/**/d/; truncate them.
  data_files = [p for p in (workdir / "checkpoints" / "8" / "state").rglob("*")
                if p.is_file() and p.parent.name == "d"]
  assert data_files, sorted(str(p) for p in (workdir / "checkpoints" / "8").rglob("*"))
  for p in data_files:
    with open(p, "r+b") as f:
      f.truncate(p.stat().st_size // 2)
  cfg = _config()

  ckpt = Checkpointer(str(workdir / "checkpoints"), cfg.checkpoint)
  try:
    with caplog.at_level(logging.WARNING, logger="training.checkpoint"):
      restored = ckpt.restore_latest(setup_from_config(cfg).abstract_state, cfg)
  finally:
    ckpt.close()
  assert restored is not None
  step, state, data_state = restored
  assert step == 4 and int(state["step"]) == 4 and data_state == {"step": 4}
  assert any(r.levelno == logging.WARNING and "step 8" in r.getMessage() and "unreadable" in r.getMessage()
             for r in caplog.records), caplog.text
  assert (workdir / "checkpoints" / "8.unreadable").is_dir()

  # Resuming starts from step 4, recomputes steps 5.. exactly and runs to the end, saving new
  # checkpoints (step 8 included) along the way.
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="shardlab"):
    result = train(cfg, str(workdir))
  assert "resumed from the checkpoint at step 4" in caplog.text
  assert result["step"] == STEPS
  assert [r["step"] for r in runs.records(workdir, "train")] == list(range(5, STEPS + 1))
  _assert_same_losses(_losses(workdir), _losses(reference), range(5, STEPS + 1))
  assert runs.complete_checkpoints(workdir)[-1] == STEPS
