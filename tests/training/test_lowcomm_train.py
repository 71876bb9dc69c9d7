"""Low-communication training end to end: `train.py` with DiLoCo over replica=4 x fsdp=2 (ZeRO-3)
killed between two outer steps and resumed with identical losses, and one algorithm per code path
of the runner through the training loop over replica=2 x data=2 x tensor=2: an outer algorithm
with an all-reduce (DiLoCo), NoLoCo's ppermute, a per-step rule (1-bit Adam) and the zeroth-order
step. The others share those paths and are proven at the op level (Streaming DiLoCo, CO2 and
SparseLoCo in tests/parallel/test_lowcomm_outer.py, EControl in tests/parallel/test_econtrol.py);
their schedules of outer steps over the same run are checked here without training. Every
algorithm's outer state is checkpointed between two outer steps (step 3; rounds of 2) and a run
resumed from there continues with the uninterrupted run's losses and bytes."""

import json
import signal

import numpy as np
import pytest

import configs
from parallel.lowcomm import dispatch
from tests import runs
from tests.training.test_checkpoint import _wait_for, _workdir_with
from training.loop import train

STEPS, H = 24, 4
DILOCO = runs.SMALL + ["mesh.replica=4", "mesh.data=1", "mesh.fsdp=2", "sharding.zero_stage=3",
                       "sharding.replica=diloco", f"lowcomm.inner_steps={H}", f"train.steps={STEPS}",
                       "checkpoint.every=7"]  # 7, 14, 21: every checkpoint mid-round (outer steps after 4, 8, ...)


def _losses(workdir) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in runs.records(workdir, "train")}


pytestmark = pytest.mark.usefixtures("subprocesses_match_this_process")


def test_diloco_sigkill_between_outer_steps_then_resume(tmp_path):
  """The uninterrupted reference trains in this process; the killed and the resumed run are
  `train.py` subprocesses, which load the reference's compiled programs from the cache."""
  reference = tmp_path / "reference"
  train(configs.get_config("tiny", DILOCO), str(reference))
  want = _losses(reference)
  assert sorted(want) == list(range(1, STEPS + 1))
  sent = {r["step"]: r["bytes_sent"] for r in runs.records(reference, "train")}
  assert all((sent[s] > 0) == (s % H == 0) for s in sent)

  workdir, log = tmp_path / "run", tmp_path / "killed.log"
  proc = runs.start(workdir, DILOCO, log)
  _wait_for(proc, lambda: any(s >= 7 for s in runs.complete_checkpoints(workdir)), "a checkpoint at step >= 7", log)
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
RESUMED_ONLY = {  # the algorithms without a row: trained only to resume them (state a row's lacks)
    "streaming_diloco": ["lowcomm.fragments=2", "lowcomm.delay=1", "lowcomm.quant_bits=4"],  # one in flight
    "co2": [],  # the stale outer update
    "sparseloco": SAME_PATH["sparseloco"],  # error feedback
    "econtrol": [],  # per-step error control
}
RESUME_AT = 3  # a checkpoint between two outer steps (rounds of 2 inner steps)


def _config(name: str, knobs: list[str]):
  return configs.get_config("tiny", runs.SMALL + [
      "mesh.replica=2", "mesh.data=2", "mesh.tensor=2", f"sharding.replica={name}", "lowcomm.inner_steps=2",
      "train.steps=8", f"checkpoint.every={RESUME_AT}", "checkpoint.keep=10", "data.max_corpus_bytes=100000"] + knobs)


def _assert_resumes(cfg, reference, tmp_path) -> None:
  """A run resumed from `reference`'s step-RESUME_AT checkpoint repeats its losses and bytes after it."""
  workdir = _workdir_with(reference, [RESUME_AT], tmp_path / "resumed")
  train(cfg, str(workdir))
  want = {r["step"]: (r["loss"], r["bytes_sent"]) for r in runs.records(reference, "train")}
  got = {r["step"]: (r["loss"], r["bytes_sent"]) for r in runs.records(workdir, "train")}
  assert sorted(got) == list(range(RESUME_AT + 1, 9))
  np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=1e-6)


@pytest.mark.parametrize("name", list(SAME_PATH))
def test_outer_steps_of_the_algorithms_that_share_a_path(name):
  """The 1-based steps at which each sends (a non-empty `events`), over the rows' 8-step run."""
  cfg = _config(name, SAME_PATH[name])
  algo = dispatch.algorithm(name, cfg.lowcomm, cfg.model.n_layers, cfg.mesh.replica)
  assert [t + 1 for t in range(8) if any(algo.events(t))] == OUTER_STEPS.get(name, [2, 4, 6, 8])


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_each_algorithm_trains_with_data_and_tensor_inside_islands(name, tmp_path):
  cfg = _config(name, ALGORITHMS[name])
  result = train(cfg, str(tmp_path / "run"))
  records = runs.records(tmp_path / "run", "train")
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
  if name != "diloco":  # DiLoCo's resume: the SIGKILL test above
    _assert_resumes(cfg, tmp_path / "run", tmp_path)


@pytest.mark.parametrize("name", list(RESUMED_ONLY))
def test_each_other_algorithm_resumes_between_outer_steps(name, tmp_path):
  cfg = _config(name, RESUMED_ONLY[name])
  train(cfg, str(tmp_path / "run"))
  _assert_resumes(cfg, tmp_path / "run", tmp_path)


def test_zeroth_order_starts_from_a_hugging_face_llama(tmp_path):
  """`checkpoint.init_from_hf`: the run takes a transformers Llama's architecture and weights. At
  step 1 the warm-up learning rate is 0, so the zeroth-order step leaves the weights as they were
  and the eval loss after it is transformers' own loss on the same validation batches."""
  import torch
  import transformers

  from data import make_dataset

  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(vocab_size=264, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    attn_implementation="eager")
  model = transformers.LlamaForCausalLM(hf_cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.1 * torch.randn_like(p))
  model.save_pretrained(tmp_path / "hf")

  cfg = configs.get_config("tiny", runs.SMALL + [
      "mesh.replica=2", "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "sharding.zero_stage=3",
      "sharding.replica=zeroth_order", "lowcomm.zo_directions=2", "lowcomm.zo_eps=1e-3", "train.steps=1",
      "train.eval_every=1", "checkpoint.enabled=false", f"checkpoint.init_from_hf={tmp_path / 'hf'}"])
  train(cfg, str(tmp_path / "run"))
  written = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
  assert (written["n_layers"], written["d_ff"], written["d_model"]) == (3, 96, 64)
  assert runs.records(tmp_path / "run", "train")[0]["lr"] == 0.0

  val = make_dataset(cfg.data, vocab_size=264, split="validation")
  total = count = 0.0
  for i in range(cfg.train.eval_batches):
    b = val.get_batch(i)
    assert np.all(b["segment_ids"] == b["segment_ids"][:, :1]), "one document per row, as transformers sees it"
    with torch.no_grad():
      logits = model(torch.tensor(b["inputs"], dtype=torch.long)).logits
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), torch.tensor(b["targets"], dtype=torch.long),
                                            reduction="none").numpy()
    total, count = total + float((nll * b["loss_mask"]).sum()), count + float(b["loss_mask"].sum())
  got = runs.records(tmp_path / "run", "eval")[0]["loss"]
  np.testing.assert_allclose(got, total / count, rtol=1e-5)
