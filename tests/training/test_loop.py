"""The training loop in this process: balancing rows over data-parallel ranks changes which device
trains on which rows, not what is learned."""

import numpy as np

import configs
from tests import runs
from training.loop import train

SMALL = [o for o in runs.SMALL if not o.startswith("data.seq_len")] + [
    "data.seq_len=128", "train.steps=3", "checkpoint.enabled=false", "data.val_fraction=0",
    "mesh.data=4", "mesh.fsdp=2", "sharding.zero_stage=3"]


def test_balanced_rows_give_the_same_losses(tmp_path):
  losses = {}
  for balance in (False, True):
    workdir = tmp_path / str(balance)
    train(configs.get_config("tiny", SMALL + [f"data.balance_attention={balance}"]), str(workdir))
    losses[balance] = [r["loss"] for r in runs.records(workdir, "train")]
  assert len(losses[True]) == 3
  np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
