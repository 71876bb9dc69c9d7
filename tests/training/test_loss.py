"""The training and evaluation losses against a hand computation.

The expected value never goes through the loss code: each document of a packed row is run through
the model alone (at the start of its own row, plain causal attention, no segment ids), and the
cross-entropy of its logits is taken in numpy (float64) and masked by hand. A loss that ignored
`loss_mask`, attended across documents, or averaged per batch instead of per token differs.
"""

import jax
import numpy as np
import pytest
from flax import nnx

import configs
from training.grad import make_grad_fn
from training.loop import evaluate
from training.state import init_state, setup_from_config
from training.step import make_eval_step
from tests.training.common import B, L, MODEL, packed_batch

LAYOUT = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "sharding.zero_stage=3"]

def documents_alone_logits(setup, params, batch) -> np.ndarray:
  """[B, L, V] logits where each position sees only its own document: every document is run at
  the start of a row of its own (causal attention, no segment ids), then put back in place."""
  model = nnx.merge(setup.graphdef, jax.device_get(params))
  docs, where = [], []
  for r in range(B):
    for s in (1, 2):
      cols = np.flatnonzero(batch["segment_ids"][r] == s)
      row = np.zeros(L, np.int32)
      row[:len(cols)] = batch["inputs"][r, cols]
      docs.append(row)
      where.append((r, cols))
  logits = np.asarray(jax.jit(lambda t: model(t))(np.stack(docs)), np.float64)
  out = np.zeros((B, L, logits.shape[-1]))
  for i, (r, cols) in enumerate(where):
    out[r, cols] = logits[i, :len(cols)]
  return out


def masked_cross_entropy(logits: np.ndarray, batch) -> tuple[float, float]:
  """(sum of -log softmax(logits)[target] over kept tokens, number of kept tokens), in float64."""
  z = logits - logits.max(-1, keepdims=True)
  log_softmax = z - np.log(np.exp(z).sum(-1, keepdims=True))
  ce = -np.take_along_axis(log_softmax, batch["targets"][..., None], -1)[..., 0]
  return float((ce * batch["loss_mask"]).sum()), float(batch["loss_mask"].sum())


@pytest.fixture(scope="module")
def setup_and_params():
  setup = setup_from_config(configs.get_config("tiny", MODEL + LAYOUT))
  return setup, init_state(setup)["params"]


def test_training_loss_is_the_masked_cross_entropy_of_each_document_alone(setup_and_params):
  setup, params = setup_and_params
  batch = packed_batch(np.random.default_rng(0), setup.config.model.vocab_size, keep=0.7)
  loss_sum, count = masked_cross_entropy(documents_alone_logits(setup, params, batch), batch)
  _, loss, tokens, _ = jax.jit(make_grad_fn(setup))(params, jax.device_put(batch, setup.batch_sharding))
  assert float(tokens) == count
  np.testing.assert_allclose(float(loss), loss_sum / count, rtol=1e-5)


class _Batches:
  def __init__(self, batches):
    self.batches = batches

  def get_batch(self, i):
    return self.batches[i]


def test_eval_loss_is_the_mean_over_all_counted_tokens(setup_and_params):
  """Two batches with very different numbers of counted tokens: the mean is over tokens."""
  setup, params = setup_and_params
  rng = np.random.default_rng(1)
  vocab = setup.config.model.vocab_size
  batches = [packed_batch(rng, vocab, keep=0.15), packed_batch(rng, vocab, keep=1.0)]
  sums = [masked_cross_entropy(documents_alone_logits(setup, params, b), b) for b in batches]
  want = sum(s for s, _ in sums) / sum(n for _, n in sums)
  got = evaluate(setup, make_eval_step(setup), params, _Batches(batches), n_batches=2)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  per_batch_mean = np.mean([s / n for s, n in sums])
  assert abs(per_batch_mean - want) > 1e-3 * want  # the two averages really differ here
