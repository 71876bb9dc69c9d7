"""Checkpoints: exact resumption after SIGKILL and SIGTERM, restore onto other meshes, corrupt and
unfinished saves.

One uninterrupted `train.py` run is the reference for all of them. Subprocess runs go through
`train.py` as a user would start them and set up their own 8-device CPU backend (conftest only
configures this process). On CPU a run is bitwise reproducible, in a subprocess or in this process.
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import configs
from data import make_dataset
from parallel.mesh import make_mesh
from parallel.rules import make_plan
from training.checkpoint import Checkpointer
from training.loop import evaluate, setup_for, train
from training.state import build_setup
from training.step import make_eval_step

REPO = Path(__file__).resolve().parents[1]
STEPS = 32  # steps are ~20 ms: long enough past the step-8 checkpoint that a kill lands mid-run
EVERY = 4
SMALL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=128",
         "model.vocab_size=264", "data.seq_len=32", "data.global_batch=8", "data.max_corpus_bytes=300000",
         "train.log_every=1", "train.eval_every=1000", "train.eval_batches=2"]
# keep=10 keeps every checkpoint of the reference run, so later tests can start from any of them.
RUN = SMALL + [f"train.steps={STEPS}", f"checkpoint.every={EVERY}", "checkpoint.keep=10"]
TIMEOUT = 300


# --- helpers ---------------------------------------------------------------------------------------

def _env() -> dict:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  return env


def _cmd(workdir: Path) -> list[str]:
  return [sys.executable, str(REPO / "train.py"), "--config=tiny", f"--workdir={workdir}",
          *[f"--set={o}" for o in RUN]]


def _run(workdir: Path) -> str:
  """Runs train.py on `workdir` to completion; returns its output (stdout and stderr)."""
  p = subprocess.run(_cmd(workdir), env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
  assert p.returncode == 0, f"train.py exited with {p.returncode}:\n{p.stdout[-4000:]}"
  return p.stdout


def _start(workdir: Path, log: Path) -> subprocess.Popen:
  with open(log, "w") as f:  # a file, unlike a pipe nobody reads, cannot fill up and block the child
    return subprocess.Popen(_cmd(workdir), env=_env(), cwd=REPO, stdout=f, stderr=subprocess.STDOUT)


def _wait_for(proc: subprocess.Popen, ready, what: str, log: Path) -> None:
  deadline = time.monotonic() + TIMEOUT
  while not ready():
    if proc.poll() is not None:
      pytest.fail(f"training exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
    if time.monotonic() > deadline:
      proc.kill()
      proc.wait()
      pytest.fail(f"timed out waiting for {what}")
    time.sleep(0.005)


def _records(workdir: Path, split: str = "train") -> list[dict]:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  out = []
  for line in path.read_text().splitlines():
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:  # a line being written right now
      continue
    if rec["split"] == split:
      out.append(rec)
  return out


def _losses(workdir: Path) -> dict[int, float]:
  """Train loss per step; a step logged twice (recomputed after a resume) keeps its last line."""
  return {r["step"]: r["loss"] for r in _records(workdir)}


def _complete_steps(workdir: Path) -> list[int]:
  """Steps of finished checkpoints: Orbax renames a save to its plain step number once complete."""
  d = workdir / "checkpoints"
  if not d.is_dir():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def _assert_same_losses(got: dict[int, float], want: dict[int, float], steps) -> None:
  steps = list(steps)
  assert all(s in got for s in steps), (sorted(got), steps)
  np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=1e-6)


def _config() -> configs.Config:
  """The reference run's config, for runs and restores in this process."""
  return configs.get_config("tiny", RUN)


def _workdir_with(reference: Path, steps, dst: Path) -> Path:
  """A fresh workdir holding copies of some of the reference run's checkpoints."""
  (dst / "checkpoints").mkdir(parents=True)
  for s in steps:
    shutil.copytree(reference / "checkpoints" / str(s), dst / "checkpoints" / str(s))
  return dst


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
  """The workdir of one uninterrupted run, with checkpoints at every EVERY steps."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  _run(workdir)
  assert sorted(_losses(workdir)) == list(range(1, STEPS + 1))
  assert _complete_steps(workdir) == list(range(EVERY, STEPS + 1, EVERY))
  return workdir


# --- killed and stopped runs -----------------------------------------------------------------------

def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(reference, tmp_path):
  workdir, log = tmp_path / "run", tmp_path / "killed.log"
  proc = _start(workdir, log)
  _wait_for(proc, lambda: any(s >= 8 for s in _complete_steps(workdir)), "a checkpoint at step >= 8", log)
  assert proc.poll() is None, "training finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL

  killed = _losses(workdir)
  n_first = len(_records(workdir))
  resume_from = _complete_steps(workdir)[-1]
  assert 8 <= resume_from < STEPS and max(killed) < STEPS, (resume_from, max(killed))

  out = _run(workdir)
  assert f"resumed from the checkpoint at step {resume_from}" in out, out[-4000:]
  # The second run starts right after its checkpoint, recomputing what the first did past it.
  assert [r["step"] for r in _records(workdir)[n_first:]] == list(range(resume_from + 1, STEPS + 1))
  assert sorted(_losses(workdir)) == list(range(1, STEPS + 1))
  _assert_same_losses(_losses(workdir), _losses(reference), range(1, STEPS + 1))
  assert _complete_steps(workdir)[-1] == STEPS


def test_sigterm_saves_where_it_stopped_and_resumes(reference, tmp_path):
  workdir, log = tmp_path / "run", tmp_path / "stopped.log"
  proc = _start(workdir, log)
  # Step 6 is logged inside the loop, so the SIGTERM handler is installed by then.
  _wait_for(proc, lambda: any(r["step"] >= 6 for r in _records(workdir)), "step 6", log)
  assert proc.poll() is None, "training finished before it could be stopped"
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0, log.read_text()[-4000:]

  stopped = max(_losses(workdir))
  assert 6 <= stopped < STEPS
  assert f"received signal {int(signal.SIGTERM)}: saved step {stopped}, stopping" in log.read_text()
  steps = _complete_steps(workdir)
  # A checkpoint at the step it stopped at, not only the last periodic one before it.
  assert steps[-1] == stopped, steps
  assert stopped // EVERY * EVERY in steps

  n_first = len(_records(workdir))
  assert n_first == stopped
  out = _run(workdir)
  assert f"resumed from the checkpoint at step {stopped}" in out, out[-4000:]
  assert [r["step"] for r in _records(workdir)[n_first:]] == list(range(stopped + 1, STEPS + 1))
  _assert_same_losses(_losses(workdir), _losses(reference), range(1, STEPS + 1))
  assert _complete_steps(workdir)[-1] == STEPS


# --- restores in this process: other meshes, unfinished and corrupt checkpoints ---------------------

def _restore_and_evaluate(ckpt_dir: Path, cfg: configs.Config, n_devices: int):
  """Restores the newest checkpoint into `cfg`'s layout on the first `n_devices` devices, evaluates it."""
  sizes = configs.validate(cfg, n_devices)
  devices = jax.devices()[:n_devices]
  s = cfg.sharding
  plan = make_plan(make_mesh(sizes, devices), zero_stage=s.zero_stage,
                   sequence_parallel=s.sequence_parallel, vocab_parallel=s.vocab_parallel)
  setup = build_setup(cfg, plan)
  ckpt = Checkpointer(str(ckpt_dir), cfg.checkpoint)
  try:
    step, state, _ = ckpt.restore_latest(setup.abstract_state)
  finally:
    ckpt.close()

  # Every restored array lives in the new layout, on the new devices.
  def check(x, want):
    assert x.sharding.spec == want.spec, (x.sharding.spec, want.spec)
    assert x.sharding.device_set == set(devices)
  jax.tree.map(check, state, setup.state_shardings)

  val = make_dataset(cfg.data, vocab_size=cfg.model.vocab_size, split="validation")
  loss = evaluate(setup, make_eval_step(setup), state["params"], val, cfg.train.eval_batches)
  return step, state, loss


def test_restore_onto_other_meshes_gives_the_same_eval_loss(reference, tmp_path):
  # The reference run trained on mesh data=8 with ZeRO 0 and evaluated at its last step.
  saved = json.loads((reference / "config.json").read_text())
  assert saved["mesh"]["data"] == -1 and saved["sharding"]["zero_stage"] == 0
  (trained_eval,) = [r["loss"] for r in _records(reference, split="eval") if r["step"] == STEPS]
  ckpt_dir = _workdir_with(reference, [STEPS], tmp_path / "run") / "checkpoints"

  assert jax.device_count() == 8
  cfg = _config()
  step, state, loss_ddp = _restore_and_evaluate(ckpt_dir, cfg, 8)
  assert step == STEPS and int(state["step"]) == STEPS
  np.testing.assert_allclose(loss_ddp, trained_eval, rtol=1e-5)

  # ZeRO-3 over fsdp=4 on half the devices: parameters and moments sharded on `embed`.
  fsdp = configs.apply_overrides(cfg, ["mesh.data=1", "mesh.fsdp=4", "sharding.zero_stage=3"])
  step, state, loss_fsdp = _restore_and_evaluate(ckpt_dir, fsdp, 4)
  assert step == STEPS
  embed = state["params"]["embed"]  # [vocab, embed]
  assert embed.sharding.spec == P(None, "fsdp")
  assert {sh.data.shape for sh in embed.addressable_shards} == {(264, 64 // 4)}
  assert state["params"]["layers"]["attn"]["wq"].sharding.spec == P(None, "fsdp", None, None)
  np.testing.assert_allclose(loss_fsdp, loss_ddp, rtol=1e-5)

  # Megatron tensor=2 x data=4 on all 8 devices: heads and vocabulary split over `tensor`.
  tp = configs.apply_overrides(cfg, ["mesh.data=4", "mesh.tensor=2"])
  step, state, loss_tp = _restore_and_evaluate(ckpt_dir, tp, 8)
  assert step == STEPS
  assert state["params"]["embed"].sharding.spec == P("tensor", None)
  assert {sh.data.shape for sh in state["params"]["embed"].addressable_shards} == {(264 // 2, 64)}
  assert state["params"]["layers"]["attn"]["wq"].sharding.spec == P(None, None, "tensor", None)
  np.testing.assert_allclose(loss_tp, loss_ddp, rtol=1e-5)


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
  abstract = setup_for(cfg).abstract_state

  ckpt = Checkpointer(str(ckpt_dir), cfg.checkpoint)
  try:
    assert sorted(ckpt.manager.all_steps()) == [4, 8]
    step, state, data_state = ckpt.restore_latest(abstract)
    assert step == 8 and int(state["step"]) == 8 and data_state == {"step": 8}
    # Saving the same step again goes through in spite of the leftover temporary directory.
    ckpt.save(12, state, {"step": 12})
    ckpt.wait()
  finally:
    ckpt.close()
  assert _complete_steps(workdir) == [4, 8, 12]

  ckpt = Checkpointer(str(ckpt_dir), cfg.checkpoint)
  try:
    step, again, data_state = ckpt.restore_latest(abstract)
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
      restored = ckpt.restore_latest(setup_for(cfg).abstract_state)
  finally:
    ckpt.close()
  assert restored is not None
  step, state, data_state = restored
  assert step == 4 and int(state["step"]) == 4 and data_state == {"step": 4}
  assert any(r.levelno == logging.WARNING and "step 8" in r.getMessage() and "unreadable" in r.getMessage()
             for r in caplog.records), caplog.text

  # Resuming starts from step 4, recomputes steps 5.. exactly and runs to the end, saving new
  # checkpoints (step 8 included) along the way.
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="shardlab"):
    result = train(cfg, str(workdir))
  assert "resumed from the checkpoint at step 4" in caplog.text
  assert result["step"] == STEPS
  assert [r["step"] for r in _records(workdir)] == list(range(5, STEPS + 1))
  _assert_same_losses(_losses(workdir), _losses(reference), range(5, STEPS + 1))
  assert _complete_steps(workdir)[-1] == STEPS

  ckpt = Checkpointer(str(workdir / "checkpoints"), cfg.checkpoint)
  try:
    assert ckpt.restore_latest(setup_for(cfg).abstract_state)[0] == STEPS
  finally:
    ckpt.close()
