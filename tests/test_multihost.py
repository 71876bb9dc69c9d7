"""Multi-host training: two local processes of 4 CPU devices each, joined by `jax.distributed`.

Each run starts `train.py` exactly as on two hosts (`--coordinator`, `--num_processes`,
`--process_id`); cross-process collectives of the CPU backend go through gloo. Every process loads
only its own rows of each global batch, so a 2-process run must reproduce, step by step, the losses
of the same configuration trained as one process with 8 devices (this test process's own, at its
matmul precision, which the 2-process runs are given too; losses and gradient norms within 1e-5).
Layouts: pure data parallel, and a hybrid mesh with `data` across the two hosts and ZeRO-3 `fsdp`
inside each (`tests/multihost_worker.py` checks that placement). The hybrid run also saves Orbax
checkpoints from both processes, and a second 2-process run resumes from one of them.

A failed or hung process gets the others killed (no test waits on a dead peer), and the output of
every process is shown. Each run is made once per session and read by every test (and xdist
worker) that compares with it.
"""

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import configs
from tests import runs
from training.loop import train

STEPS = 5
RTOL = 1e-5
SMALL = runs.SMALL + [f"train.steps={STEPS}"]
NO_CKPT = ["checkpoint.enabled=false"]
DATA_PARALLEL = ["mesh.data=-1"]
HYBRID = ["mesh.data=2", "mesh.fsdp=4", "sharding.zero_stage=3"]
CKPT_EVERY = 3  # saves at steps 3 and 5 (the last step is always saved)

pytestmark = pytest.mark.usefixtures("subprocesses_match_this_process")


# --- helpers ---------------------------------------------------------------------------------------

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _tail(log: Path, lines: int = 150) -> str:
  return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no output)"


def _launch(script: str, args: list[str], workdir: Path, n_proc: int, devices: int) -> tuple[str, list[Path]]:
  """Starts `n_proc` processes of `script` (one coordinator port) and waits for all of them.

  Returns ("", logs) on success, or (reason, logs) once any process fails or the run times out;
  the other processes are then killed at once, so that none waits forever on a dead peer.
  """
  logs = [workdir.parent / f"{workdir.name}.proc{i}.log" for i in range(n_proc)]
  dist = [[] for _ in range(n_proc)]
  if n_proc > 1:
    port = _free_port()
    dist = [[f"--coordinator=127.0.0.1:{port}", f"--num_processes={n_proc}", f"--process_id={i}"]
            for i in range(n_proc)]
  procs = []
  try:
    for i, log in enumerate(logs):
      with open(log, "w") as f:  # a file cannot fill up and block the child like a pipe
        procs.append(subprocess.Popen([sys.executable, str(runs.REPO / script), *args, *dist[i]], env=runs.env(devices),
                                      cwd=runs.REPO, stdout=f, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + runs.TIMEOUT
    while True:
      codes = [p.poll() for p in procs]
      bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if bad:
        return ", ".join(f"process {i} exited with {c}" for i, c in bad), logs
      if all(c == 0 for c in codes):
        return "", logs
      if time.monotonic() > deadline:
        running = [i for i, c in enumerate(codes) if c is None]
        return f"timed out after {runs.TIMEOUT}s (still running: processes {running})", logs
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _run_script(script: str, args: list[str], workdir: Path, n_proc: int, devices: int) -> list[str]:
  """Runs `script` as `n_proc` processes to completion; returns each one's output (stdout + stderr)."""
  why, logs = _launch(script, args, workdir, n_proc, devices)
  if why.startswith("process") and any("Address already in use" in log.read_text(errors="replace")
                                       for log in logs):
    why, logs = _launch(script, args, workdir, n_proc, devices)  # the free port was taken meanwhile
  if why:
    report = "\n".join(f"----- process {i} of {n_proc} (stdout + stderr, last lines) -----\n{_tail(log)}"
                       for i, log in enumerate(logs))
    pytest.fail(f"{script} as {n_proc} process(es) x {devices} devices failed: {why}\n{report}", pytrace=False)
  return [log.read_text(errors="replace") for log in logs]


def _run(workdir: Path, overrides: list[str], n_proc: int, devices: int) -> list[str]:
  """Runs train.py on `workdir` to completion."""
  args = ["--config=tiny", f"--workdir={workdir}", *[f"--set={o}" for o in SMALL + overrides]]
  return _run_script("train.py", args, workdir, n_proc, devices)


def _assert_same_steps(got: list[dict], want: list[dict]) -> None:
  """Same splits and steps, same token counts, and losses (and grad norms) within RTOL."""
  assert [(r["split"], r["step"]) for r in got] == [(r["split"], r["step"]) for r in want]
  train_got = [r for r in got if r["split"] == "train"]
  train_want = [r for r in want if r["split"] == "train"]
  assert [r["tokens"] for r in train_got] == [r["tokens"] for r in train_want], "different batches"
  np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=RTOL,
                             err_msg="losses (train and eval), 2 processes vs 1 process")
  np.testing.assert_allclose([r["grad_norm"] for r in train_got], [r["grad_norm"] for r in train_want],
                             rtol=RTOL, err_msg="gradient norms, 2 processes vs 1 process")


def _check_mesh(output: str, mesh: str) -> None:
  assert f"mesh: {mesh} (8 devices, 2 processes)" in output, "the run did not span 2 processes:\n" + output[-3000:]


# --- runs (each once per session) ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_once(shared_once):
  """Lazily runs, and caches for the session, a run by (name, layout overrides, processes,
  devices per process): train.py as `n_proc` processes, or (n_proc=1) `train` in this process
  on its 8 devices. Returns (workdir, each process's output)."""
  done = {}

  def build(path: Path, overrides: list[str], n_proc: int, devices: int) -> None:
    if n_proc == 1:
      assert devices == len(jax.devices()), (devices, jax.devices())
      train(configs.get_config("tiny", SMALL + overrides), str(path / "run"))
    else:
      _run(path / "run", overrides, n_proc, devices)

  def get(name: str, overrides: list[str], n_proc: int, devices: int) -> tuple[Path, list[str]]:
    if name not in done:
      try:
        path = shared_once(f"multihost-{name}", lambda path: build(path, overrides, n_proc, devices))
        outputs = [(path / f"run.proc{i}.log").read_text(errors="replace") for i in range(n_proc)] if n_proc > 1 else []
        done[name] = path / "run", outputs
      except BaseException as err:  # pytest.fail: a failed run is reported once, not rerun
        done[name] = err
        raise
    if isinstance(done[name], BaseException):
      pytest.fail(f"the run {name!r} failed in an earlier test: {str(done[name])[:2000]}", pytrace=False)
    return done[name]

  return get


def _reference(run_once, name: str, layout: list[str]) -> list[dict]:
  """The same configuration as one process with 8 devices (this one)."""
  workdir, _ = run_once(f"{name}_1proc", layout + NO_CKPT, 1, 8)
  records = runs.records(workdir)
  assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, STEPS + 1))
  return records


def _hybrid_with_checkpoints(run_once) -> tuple[Path, list[str]]:
  return run_once("hybrid_2proc", HYBRID + [f"checkpoint.every={CKPT_EVERY}"], 2, 4)


# --- tests -----------------------------------------------------------------------------------------

def test_hybrid_mesh_spreads_outer_axes_over_hosts(tmp_path):
  """`make_mesh` across 2 processes: the outer axes (`data`, else `fsdp`) split the hosts; inner ones do not."""
  outputs = _run_script("tests/multihost_worker.py", [], tmp_path / "mesh", 2, 4)
  for i, out in enumerate(outputs):
    lines = [line for line in out.splitlines() if line.startswith("MESHES ")]
    assert lines, f"process {i} printed no meshes:\n{out[-3000:]}"
    meshes = json.loads(lines[-1][len("MESHES "):])
    for m in meshes.values():
      assert m["process_count"] == 2
    dp = np.array(meshes["data_parallel"]["process"]).reshape(-1)
    assert dp.tolist() == [0] * 4 + [1] * 4, dp
    hybrid = meshes["hybrid"]
    axes = dict(zip(hybrid["axes"], hybrid["shape"]))
    assert axes["data"] == 2 and axes["fsdp"] == 4
    owners = np.array(hybrid["process"]).reshape(2, 4)  # (data, fsdp); the other axes have size 1
    assert owners.tolist() == [[0] * 4, [1] * 4], owners
    ft = meshes["fsdp_tensor"]
    owners = np.array(ft["process"]).reshape(4, 2)  # (fsdp, tensor): fsdp crosses hosts, tensor does not
    assert owners.tolist() == [[0, 0], [0, 0], [1, 1], [1, 1]], owners


def test_data_parallel_two_processes_match_one(run_once):
  want = _reference(run_once, "dp", DATA_PARALLEL)
  workdir, outputs = run_once("dp_2proc", DATA_PARALLEL + NO_CKPT, 2, 4)
  _check_mesh(outputs[0], "data=8")
  _assert_same_steps(runs.records(workdir), want)


def test_hybrid_data_across_hosts_fsdp_inside_matches_one(run_once):
  want = _reference(run_once, "hybrid", HYBRID)
  workdir, outputs = _hybrid_with_checkpoints(run_once)
  _check_mesh(outputs[0], "data=2 x fsdp=4")
  _assert_same_steps(runs.records(workdir), want)
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [CKPT_EVERY, STEPS], f"checkpoints of the 2-process run: {steps}"


def test_two_processes_resume_from_checkpoint(run_once, tmp_path):
  want = [r for r in _reference(run_once, "hybrid", HYBRID) if r["step"] > CKPT_EVERY]
  saved, _ = _hybrid_with_checkpoints(run_once)
  assert (saved / "checkpoints" / str(CKPT_EVERY)).is_dir(), "the 2-process run wrote no checkpoint"
  # A copy without the last checkpoint and metrics: the new run must resume from step CKPT_EVERY.
  workdir = tmp_path / "resume"
  shutil.copytree(saved / "checkpoints", workdir / "checkpoints",
                  ignore=lambda d, names: [str(STEPS)] if Path(d) == saved / "checkpoints" else [])
  outputs = _run(workdir, HYBRID + [f"checkpoint.every={CKPT_EVERY}"], 2, 4)
  for i, out in enumerate(outputs):
    assert f"resumed from the checkpoint at step {CKPT_EVERY}" in out, f"process {i}:\n{out[-3000:]}"
  _assert_same_steps(runs.records(workdir), want)
  assert (workdir / "checkpoints" / str(STEPS)).is_dir(), "the resumed run did not save its last step"


LOWCOMM = ["mesh.replica=2", "mesh.data=1", "mesh.fsdp=4", "sharding.zero_stage=3", "sharding.replica=diloco",
           "lowcomm.inner_steps=2"]


def test_diloco_islands_on_two_hosts_match_one_process(run_once):
  """`replica` across the two processes (one island of ZeRO-3 over 4 devices per host), DiLoCo's
  outer steps the only traffic between them: the same losses as one process with 8 devices."""
  want = _reference(run_once, "diloco", LOWCOMM)
  workdir, outputs = run_once("diloco_2proc", LOWCOMM + NO_CKPT, 2, 4)
  _check_mesh(outputs[0], "replica=2 x fsdp=4")
  _assert_same_steps(runs.records(workdir), want)
  assert [r["bytes_sent"] > 0 for r in runs.records(workdir, "train")] == [False, True, False, True, False]
