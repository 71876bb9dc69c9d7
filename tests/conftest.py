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
