"""Disaggregation across two processes: prompts computed by a prefill worker process
(`python -m serving.prefill_worker`), their keys and values sent over TCP on 127.0.0.1, decoded by
the engine here; the same tokens and log-probabilities as the colocated engine."""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest

import configs
from serving.engine import Request, SamplingParams
from serving.loading import load
from tests import runs
from tests.serving.tiny import greedy, make_engine, run

SERVED = ["model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64", "model.max_seq_len=64",
          "data.seq_len=64", "model.init_std=0.5"]


@pytest.fixture(scope="module")
def worker():
  """A prefill worker on two emulated devices (tensor-parallel over both), same initialisation."""
  cmd = [sys.executable, "-m", "serving.prefill_worker", "--config=tiny", "--slots=4", "--max_len=64", "--port=0",
         "--set=mesh.tensor=2", *[f"--set={o}" for o in SERVED]]
  proc = subprocess.Popen(cmd, cwd=runs.REPO, env=runs.env(devices=2), stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  try:
    line = proc.stdout.readline()
    assert "prefill worker listening on 127.0.0.1:" in line, line
    yield line.rsplit(" ", 1)[1].strip()
  finally:
    proc.kill()
    proc.wait()


def test_prompts_from_a_worker_process_decode_as_colocated(worker):
  loaded = load(configs.get_config("tiny", SERVED), devices=jax.devices()[:1])
  model, params = loaded.config.model, loaded.params
  rng = np.random.default_rng(2)
  requests = [greedy(str(i), rng.integers(0, 256, n), 7) for i, n in enumerate((4, 21, 9))]
  requests.append(Request("s", (5, 6, 7, 8), SamplingParams(max_tokens=7, temperature=1.0, top_k=20, seed=4,
                                                             logprobs=True)))
  with pytest.raises(ValueError, match="serves .*'slots': 4.*needs .*'slots': 2"):
    make_engine(params, cfg=model, slots=2, plan=loaded.plan, prefill_worker=worker)  # disconnects, refused
  want = run(make_engine(params, cfg=model, slots=4, plan=loaded.plan), requests)
  engine = make_engine(params, cfg=model, slots=4, plan=loaded.plan, prefill_worker=worker)
  got = run(engine, requests, joins=None)
  assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in want.items()}
  for k in want:
    np.testing.assert_allclose(got[k][1], want[k][1], rtol=1e-4, atol=1e-4)
  moved = engine.transfers
  assert moved["count"] == len(requests) and moved["bytes"] > 0 and moved["seconds"] > 0
