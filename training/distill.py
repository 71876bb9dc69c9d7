"""Knowledge distillation: a trained teacher's token distributions as the student's soft targets
(Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"). Its first use here is the draft
model of speculative decoding, whose speed-up grows with how often it agrees with the target:
trained on the target's distributions rather than on the text alone, it learns to agree with the
target (DistillSpec, Zhou et al. 2024).

`distill.teacher` names a shardlab run (its workdir or its checkpoints/ folder). The config saved
with its newest checkpoint gives the teacher's architecture, the checkpoint its parameters, restored
onto the student's mesh with the student's sharding rules (any layout the student trains under,
but a pipeline or a replica runner: `configs/validate/distill.py`). Before each step the loop runs
the teacher's forward pass on the step's batch (`Teacher.add_logits`, no gradients) and puts its
logits into the batch as `teacher_logits` [B, L, V] (the teacher's compute dtype, in the plan's
token order, laid out over the batch's mesh axes); the loss (`training.loss.loss_terms`) mixes
the cross-entropy with the KL divergence from the teacher's tempered distribution by
`distill.weight` and logs the KL as `distill_kl`. Evaluation stays the plain cross-entropy.

The teacher's forward pass is not in the logged MFU, which counts the student's FLOPs alone.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
from flax import nnx

from configs import Config, ConfigError, ModelConfig, validate
from models.transformer import Transformer, abstract_params
from parallel.attention.dispatch import order_batch
from parallel.plan import plan_from_config
from training.checkpoint import restore_params, saved_run_config
from training.loss import Batch, model_logits, uses_segments
from training.state import TrainSetup

log = logging.getLogger("shardlab")


def teacher_config(config: Config, model: ModelConfig) -> Config:
  """The student's config with the teacher's model section (mesh, sharding and data stay the student's)."""
  return dataclasses.replace(config, model=model, distill=dataclasses.replace(config.distill, teacher=""))


def saved_model_config(path: str) -> ModelConfig:
  """The model section saved with a run's newest checkpoint."""
  saved = saved_run_config(path).get("model", {})
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  return ModelConfig(**{k: v for k, v in saved.items() if k in known})


class Teacher:
  """A teacher's parameters on the student's mesh and its jitted forward pass: `add_logits(batch)`."""

  def __init__(self, setup: TrainSetup, model: ModelConfig, params=None):
    """`model`: the teacher's architecture; `params`: its parameters (a pure dict), or None to
    restore them from the run `setup.config.distill.teacher`."""
    student = setup.config
    if model.vocab_size != student.model.vocab_size:
      raise ConfigError(f"distill.teacher={student.distill.teacher!r} has model.vocab_size={model.vocab_size}, the "
                        f"student {student.model.vocab_size}: both must share one vocabulary")
    if model.n_experts:
      raise ConfigError(f"distill.teacher={student.distill.teacher!r} is a mixture of experts: its router biases are "
                        "not restored with its parameters; teachers are dense models")
    config = teacher_config(student, model)
    mesh = setup.plan.mesh
    try:
      validate(config, mesh.devices.size, mesh.devices.flat[0].platform)
    except ConfigError as err:
      raise ConfigError(f"distill.teacher={student.distill.teacher!r} does not fit the student's mesh: {err}") from err
    plan = plan_from_config(config, mesh)
    abstract = abstract_params(model, plan)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    if params is None:
      step, params = restore_params(student.distill.teacher, abstract, config)
      log.info("distillation teacher: step %d of %s (d_model %d, %d layers)", step, student.distill.teacher,
               model.d_model, model.n_layers)
    else:
      params = jax.device_put(params, shardings)
    self.config, self.params = config, params
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(model, rngs=nnx.Rngs(0))))
    masked = uses_segments(config)

    def logits(params, batch: Batch):
      # In the plan's token order, as the loss reads the student's own logits.
      return model_logits(nnx.merge(graphdef, params), order_batch(batch, plan), plan, masked)[0]

    self._logits = jax.jit(logits, in_shardings=(shardings, setup.batch_sharding), out_shardings=setup.batch_sharding)

  @classmethod
  def from_run(cls, setup: TrainSetup) -> Teacher:
    """The teacher `setup.config.distill.teacher` names (architecture and parameters from its checkpoint)."""
    return cls(setup, saved_model_config(setup.config.distill.teacher))

  def add_logits(self, batch: Batch) -> Batch:
    """The batch with the teacher's `teacher_logits` [B, L, V] (an input of the step: constants to
    the student's gradient)."""
    return {**batch, "teacher_logits": self._logits(self.params, batch)}
