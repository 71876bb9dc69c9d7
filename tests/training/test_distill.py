"""Knowledge distillation: the KL term against numpy, the distilled objective's gradient against one
written here, a mesh equal to one device, a teacher restored from a run by `train`, and the
configurations refused."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
from configs import ConfigError, ModelConfig
from models.transformer import Transformer
from tests import runs
from tests.reference import assert_close
from tests.training.common import MODEL, packed_batch
from training.distill import Teacher
from training.grad import make_grad_fn
from training.loop import train
from training.loss import distillation_losses
from training.state import init_state, setup_from_config
from training.step import make_train_step

WEIGHT, TEMPERATURE, STEPS = 0.7, 2.0, 3
# A teacher of another shape, with peaked distributions (a large init), over the student's vocabulary.
TEACHER = ModelConfig(vocab_size=64, d_model=48, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=16,
                      init_std=0.3)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl(student, teacher, temperature):
  """numpy, float64: KL(softmax(teacher / T) || softmax(student / T)) per row."""
  lp = _log_softmax(np.asarray(teacher, np.float64) / temperature)
  lq = _log_softmax(np.asarray(student, np.float64) / temperature)
  return (np.exp(lp) * (lp - lq)).sum(-1)


def test_distillation_loss_is_the_kl_of_the_tempered_distributions():
  rng = np.random.default_rng(0)
  student, teacher = 3 * rng.normal(size=(2, 3, 11)), 3 * rng.normal(size=(2, 3, 11))
  for temperature in (1.0, 2.5):
    got = distillation_losses(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.bfloat16), temperature)
    want = _kl(student, np.asarray(jnp.asarray(teacher, jnp.bfloat16), np.float64), temperature)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  same = distillation_losses(jnp.asarray(student, jnp.float32), jnp.asarray(student, jnp.float32), 1.0)
  np.testing.assert_allclose(same, 0.0, atol=1e-6)


def _config(*overrides):
  return configs.get_config("tiny", MODEL + [f"distill.weight={WEIGHT}", f"distill.temperature={TEMPERATURE}",
                                             "optimizer.learning_rate=1e-2", *overrides])


def _teacher_params():
  return nnx.to_pure_dict(nnx.state(Transformer(TEACHER, rngs=nnx.Rngs(7))))


def _batches():
  rng = np.random.default_rng(3)
  return [packed_batch(rng, 64, 0.9) for _ in range(STEPS)]


def _distilled_steps(config, devices):
  """Metrics of STEPS distilled train steps."""
  setup = setup_from_config(config, devices)
  teacher = Teacher(setup, TEACHER, _teacher_params())
  state, step, out = init_state(setup), make_train_step(setup), []
  for batch in _batches():
    state, metrics = step(state, teacher.add_logits(jax.device_put(batch, setup.batch_sharding)))
    out.append({k: float(metrics[k]) for k in ("loss", "distill_kl", "grad_norm")})
  return out


@pytest.fixture(scope="module")
def one_device():
  return _distilled_steps(_config(), jax.devices()[:1])


def test_distilled_objective_and_its_gradient_match_a_reference_written_here():
  """The logged KL is numpy's over the masked tokens, and the step's gradient is that of
  ((1 - w) CE + w T^2 KL) / tokens written here with the model called as a plain function."""
  config = _config()
  setup = setup_from_config(config, jax.devices()[:1])
  params = init_state(setup)["params"]
  batch = jax.device_put(_batches()[0], setup.batch_sharding)
  teacher = Teacher(setup, TEACHER, _teacher_params())
  with_logits = teacher.add_logits(batch)
  teacher_model = nnx.merge(nnx.split(nnx.eval_shape(lambda: Transformer(TEACHER, rngs=nnx.Rngs(0))))[0],
                            _teacher_params())
  args = (batch["inputs"], batch["positions"], batch["segment_ids"])
  teacher_logits = teacher_model(*args)
  np.testing.assert_allclose(with_logits["teacher_logits"], teacher_logits, rtol=1e-5, atol=1e-5)

  def objective(p):
    logits = nnx.merge(setup.graphdef, p)(*args)
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    lp = jax.nn.log_softmax(teacher_logits / TEMPERATURE, axis=-1)
    kl = jnp.sum(jnp.exp(lp) * (lp - jax.nn.log_softmax(logits / TEMPERATURE, axis=-1)), axis=-1)
    mask = batch["loss_mask"]
    return jnp.sum(((1 - WEIGHT) * ce + WEIGHT * TEMPERATURE ** 2 * kl) * mask) / jnp.sum(mask), logits

  (_, logits), want = jax.value_and_grad(objective, has_aux=True)(params)
  grads, _, count, stats = make_grad_fn(setup)(params, with_logits)
  assert_close(grads, want, what="gradients")
  mask = np.asarray(batch["loss_mask"])
  kl = np.sum(_kl(logits, teacher_logits, TEMPERATURE) * mask)
  np.testing.assert_allclose(float(stats["distill_kl"]), kl, rtol=1e-5)
  assert kl / mask.sum() > 0.1  # the teacher is far from the student: the check has something to see


@pytest.mark.parametrize("layout", [
    # ZeRO-3 over data x fsdp x tensor (the vocabulary split over tensor) with two microbatches
    ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "sharding.zero_stage=3", "data.microbatches=2"),
    # ring attention over seq in the zigzag order: the teacher's logits come in the plan's token order
    ("mesh.data=2", "mesh.seq=2", "mesh.tensor=2", "sharding.attention=ring", "sharding.context_layout=zigzag"),
], ids=["zero3_data_fsdp_tensor_micro2", "ring_zigzag_data_seq_tensor"])
def test_distillation_on_a_mesh_matches_one_device(layout, one_device):
  got = _distilled_steps(_config(*layout), jax.devices())
  assert one_device[-1]["distill_kl"] < one_device[0]["distill_kl"]  # the steps pull the student in
  for g, w in zip(got, one_device):
    np.testing.assert_allclose([g[k] for k in w], list(w.values()), rtol=1e-5)


def test_train_restores_the_teacher_from_a_run(tmp_path):
  """`train` with distill.teacher: the teacher's architecture and parameters come from its run's
  checkpoint, and the student logs the KL; a teacher over another vocabulary is refused."""
  small = runs.SMALL + ["checkpoint.async_save=false", "data.val_fraction=0"]
  train(configs.get_config("tiny", small + ["model.d_model=32", "model.n_layers=1", "train.steps=2"]),
        str(tmp_path / "teacher"))
  student = small + ["model.n_layers=1", "train.steps=2", "checkpoint.enabled=false",
                     f"distill.teacher={tmp_path / 'teacher'}"]
  train(configs.get_config("tiny", student), str(tmp_path / "student"))
  records = runs.records(tmp_path / "student", "train")
  assert [r["step"] for r in records] == [1, 2] and all(r["distill_kl"] > 0 for r in records), records
  with pytest.raises(ConfigError, match=r"distill.teacher=.* has model.vocab_size=264, the student 300"):
    train(configs.get_config("tiny", student + ["model.vocab_size=300"]), str(tmp_path / "other"))
  with pytest.raises(ConfigError, match=r"no checkpoints at .*nowhere"):
    train(configs.get_config("tiny", student[:-1] + [f"distill.teacher={tmp_path / 'nowhere'}"]),
          str(tmp_path / "none"))


@pytest.mark.parametrize("overrides, message", [
    (["distill.weight=1.5"], r"distill.weight=1.5: must be in \[0, 1\]"),
    (["distill.temperature=0"], r"distill.temperature=0.0: must be positive"),
    (["distill.teacher=x", "mesh.stage=2", "mesh.data=4", "sharding.pipeline=1f1b",
      "data.microbatches=2"], r"distill.teacher with mesh.stage=2"),
    (["distill.teacher=x", "mesh.replica=2", "mesh.data=4", "sharding.replica=diloco"],
     r"distill.teacher with sharding.replica='diloco'"),
])
def test_bad_distillation_configs_are_refused(overrides, message):
  with pytest.raises(ConfigError, match=message):
    configs.validate(configs.get_config("tiny", MODEL + overrides), 8, "cpu")


def test_teacher_that_does_not_fit_the_mesh_is_refused():
  setup = setup_from_config(_config("mesh.data=4", "mesh.tensor=2"), jax.devices())
  with pytest.raises(ConfigError, match=r"does not fit the student's mesh: .*n_heads=3"):
    Teacher(setup, dataclasses.replace(TEACHER, n_heads=3, n_kv_heads=3), None)
