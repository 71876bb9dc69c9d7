"""`train.py` end to end, as a user runs it: a short training run and its outputs, and bad configs."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from tests import runs

STEPS = 12


def _tensorboard_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
  """tag -> [(step, value)] from a TensorBoard event file (TFRecord framing of `Event` protos)."""
  from tensorboardX.proto import event_pb2
  out: dict[str, list[tuple[int, float]]] = {}
  data = path.read_bytes()
  pos = 0
  while pos < len(data):
    (length,) = struct.unpack_from("<Q", data, pos)
    pos += 12  # length, then its CRC
    event = event_pb2.Event.FromString(data[pos:pos + length])
    pos += length + 4  # payload, then its CRC
    for v in event.summary.value:
      out.setdefault(v.tag, []).append((event.step, v.simple_value))
  assert pos == len(data), "truncated event file"
  return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("e2e")
  p = runs.train(workdir, runs.SMALL + [f"train.steps={STEPS}", "checkpoint.every=100", "mesh.data=-1"])
  return workdir, p


def test_runs_to_completion(run):
  workdir, p = run
  assert p.returncode == 0, p.stderr[-4000:]
  assert "mesh: data=8 (8 devices" in p.stderr
  assert "done:" in p.stderr
  # Checkpointed at the end even though no periodic checkpoint was due.
  assert sorted(d.name for d in (workdir / "checkpoints").iterdir() if d.name.isdigit()) == [str(STEPS)]


def test_metrics_show_the_loss_falling(run):
  workdir, p = run
  assert p.returncode == 0, p.stderr[-4000:]
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train] == list(range(1, STEPS + 1))
  losses = np.array([r["loss"] for r in train])
  assert np.isfinite(losses).all()
  assert losses[-3:].mean() < losses[0], losses
  assert all(k in train[-1] for k in ("grad_norm", "lr", "step_time_s", "tokens_per_s"))
  evals = [r for r in records if r["split"] == "eval"]
  assert [r["step"] for r in evals] == [STEPS] and np.isfinite(evals[0]["loss"])


def test_config_json_records_the_overrides(run):
  workdir, p = run
  assert p.returncode == 0, p.stderr[-4000:]
  cfg = json.loads((workdir / "config.json").read_text())
  assert cfg["name"] == "tiny"
  assert cfg["model"]["d_model"] == 64 and cfg["model"]["vocab_size"] == 264
  assert cfg["train"]["steps"] == STEPS and cfg["data"]["seq_len"] == 32


def test_tensorboard_events_hold_the_train_loss(run):
  workdir, p = run
  assert p.returncode == 0, p.stderr[-4000:]
  files = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert len(files) == 1, files
  scalars = _tensorboard_scalars(files[0])
  jsonl = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  want = [(r["step"], r["loss"]) for r in jsonl if r["split"] == "train"]
  got = scalars["train/loss"]
  assert [s for s, _ in got] == [s for s, _ in want]
  np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)
  assert [s for s, _ in scalars["eval/loss"]] == [STEPS]


@pytest.mark.parametrize("overrides, config, names", [
    # Valid on their own (d_model 96 / 6 heads = 16), but 6 query heads cannot share 4 KV heads.
    (["model.d_model=96", "model.n_heads=6", "model.n_kv_heads=4"], "tiny", ["model.n_heads=6", "model.n_kv_heads=4"]),
    (["model.not_a_field=1"], "tiny", ["model.not_a_field"]),
])
def test_bad_config_prints_one_line_and_exits_nonzero(tmp_path, overrides, config, names):
  workdir = tmp_path / "run"
  p = runs.train(workdir, runs.SMALL + overrides, config=config)
  assert p.returncode == 2, p.stderr[-4000:]
  assert "Traceback" not in p.stderr, p.stderr[-4000:]
  errors = [line for line in p.stderr.splitlines() if "Error" in line]
  assert len(errors) == 1 and errors[0].startswith("ConfigError: "), p.stderr[-4000:]
  for name in names:
    assert name in errors[0], errors[0]
  assert not workdir.exists()  # rejected before anything was written
