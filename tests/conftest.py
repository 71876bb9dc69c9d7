"""Forces an 8-device CPU backend before JAX starts; tests build their own meshes from jax.devices().

Compilation dominates the suite's time, so two settings cut it (neither changes a result):
- XLA's CPU backend compiles at LLVM optimisation level 0: the HLO, and so every value, is the
  same; only the machine code is slower, which the tiny test models do not notice.
- All test processes (pytest-xdist workers, and the `train.py` subprocesses they start) share one
  persistent compilation cache for the session, so a program compiled once (the same layout in
  another test, a resumed run) is loaded instead of compiled again.
"""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
# Set by the first process of the session (the xdist controller); inherited by workers and subprocesses.
_OWNS_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWNS_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="shardlab-test-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_unconfigure(config):
  if _OWNS_CACHE and not hasattr(config, "workerinput"):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# --- sharing expensive runs ------------------------------------------------------------------------

import fcntl  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shared_once(tmp_path_factory):
  """once(name, build) -> a directory that `build(directory)` filled, at most once per session.

  pytest-xdist hands out a module's tests to whichever worker is free, so a module-scoped
  fixture is often built once per worker; a run built through `once` is built by the first
  worker that asks for it (the others wait for it on a file lock) and read by all. A build that
  raises leaves nothing behind, so the next test to ask builds it again.
  """
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # this session's, shared by its workers

  def once(name: str, build) -> Path:
    path, done = root / f"shared-{name}", root / f"shared-{name}.done"
    with open(root / f"shared-{name}.lock", "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      try:
        if not done.exists():
          shutil.rmtree(path, ignore_errors=True)
          path.mkdir()
          try:
            build(path)
          except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
          done.touch()
      finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
    return path

  return once


@pytest.fixture(scope="module")
def subprocesses_match_this_process():
  """`train.py` subprocesses started meanwhile use this process's matmul precision (set above).

  The precision is part of every compiled program, so with it the subprocesses and the runs in
  this process compile the same programs and load each other's from the compilation cache. (On
  the CPU backend it does not change the values: a `train.py` run's losses and gradient norms are
  bitwise the same under either.)
  """
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("JAX_DEFAULT_MATMUL_PRECISION", str(jax.config.jax_default_matmul_precision))
    yield
