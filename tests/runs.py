"""Running `train.py` as a user does, in a subprocess with its own emulated CPU devices.

Every test that starts `train.py` goes through these helpers. The subprocesses inherit the
session's persistent compilation cache (`JAX_COMPILATION_CACHE_DIR`, see conftest.py), so the
second run of a configuration (a resume, the same layout in-process) skips XLA compilation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds per run: generous, as a loaded 2-core machine is slow
# A small model on the built-in corpus: a step takes ~20 ms on 8 emulated devices.
SMALL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=128",
         "model.vocab_size=264", "data.seq_len=32", "data.global_batch=8", "data.max_corpus_bytes=300000",
         "train.log_every=1", "train.eval_every=1000", "train.eval_batches=2"]


def env(devices: int = 8) -> dict:
  """The environment of a subprocess: CPU only, `devices` emulated devices (and the session's
  compilation cache, inherited from os.environ)."""
  out = dict(os.environ)
  out["JAX_PLATFORMS"] = "cpu"
  flags = [f for f in out.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  out["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  out["PYTHONUNBUFFERED"] = "1"
  return out


def command(workdir: Path, overrides: list[str], config: str = "tiny") -> list[str]:
  return [sys.executable, str(REPO / "train.py"), f"--config={config}", f"--workdir={workdir}",
          *[f"--set={o}" for o in overrides]]


def train(workdir: Path, overrides: list[str], config: str = "tiny") -> subprocess.CompletedProcess:
  """Runs train.py to the end; returns the completed process (stdout and stderr as text)."""
  return subprocess.run(command(workdir, overrides, config), env=env(), cwd=REPO, capture_output=True,
                        text=True, timeout=TIMEOUT)


def start(workdir: Path, overrides: list[str], log: Path) -> subprocess.Popen:
  """Starts train.py in the background, its output (stdout and stderr) going to `log`."""
  with open(log, "w") as f:  # a file, unlike a pipe nobody reads, cannot fill up and block the child
    return subprocess.Popen(command(workdir, overrides), env=env(), cwd=REPO, stdout=f, stderr=subprocess.STDOUT)


def records(workdir: Path, split: str | None = None) -> list[dict]:
  """The complete lines of `metrics.jsonl` (optionally of one split), in order."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  out = []
  for line in path.read_text().splitlines():
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:  # a line being written right now
      continue
    if split is None or rec["split"] == split:
      out.append(rec)
  return out


def complete_checkpoints(workdir: Path) -> list[int]:
  """Steps of finished checkpoints: Orbax renames a save to its plain step number once complete."""
  d = workdir / "checkpoints"
  if not d.is_dir():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())
