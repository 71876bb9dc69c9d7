"""What a server serves: parameters, the plan that lays them out, and the run's tokenizer.

Parameters come from one of three places:
  checkpoint  a shardlab run's workdir (or its checkpoints/ folder): the parameters only
              (`training.checkpoint.restore_params`), restored straight into the plan's layout;
              the config must describe the same model (a mismatch names the fields that differ)
  hf          a Hugging Face directory (`models.hf_moe.config_with_hf`): its config.json replaces the
              config's model architecture (dtypes, attention implementation, remat and unroll are
              kept); the engine serves the dense ones (Llama, Qwen2, Qwen3)
  neither     a random initialisation from `train.seed` (for trying the server out)

The mesh and plan come from the config's `mesh` and `sharding` sections, as in training (the
same rule tables): `mesh.tensor` splits heads and MLP units for tensor-parallel decode.

The tokenizer is `data.tokenizer` ("bytes" or a tokenizer.json); with `hf` and the default
"bytes", the directory's own tokenizer.json is used when it has one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from configs import Config, ConfigError, get_config
from configs.validate import validate
from data.tokenizer import Tokenizer, load_tokenizer
from models.hf_moe import config_with_hf, params_from_dir
from models.transformer import Transformer, abstract_params
from parallel.mesh import make_mesh
from parallel.plan import ShardingPlan, plan_from_config


@dataclasses.dataclass
class Loaded:
  config: Config  # with the model section of an `hf` checkpoint
  params: Any  # pure dict, laid out by `plan.params`
  plan: ShardingPlan
  tokenizer: Tokenizer


def load(config: Config, *, checkpoint: str | None = None, hf: str | None = None,
         devices: list[jax.Device] | None = None) -> Loaded:
  """Parameters (see the module docstring), plan and tokenizer; `devices` default to all."""
  if checkpoint and hf:
    raise ConfigError("give a shardlab checkpoint or a Hugging Face directory, not both")
  if hf:
    config = config_with_hf(config, hf)

  devices = list(jax.devices() if devices is None else devices)
  sizes = validate(config, len(devices), devices[0].platform)
  plan = plan_from_config(config, make_mesh(sizes, devices))
  abstract = abstract_params(config.model, plan)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)

  if hf:
    params = jax.device_put(params_from_dir(hf, config.model), shardings)
  elif checkpoint:
    from training.checkpoint import restore_params  # deferred: Orbax only when a checkpoint is read
    _, params = restore_params(checkpoint, abstract, config)
  else:
    init = lambda: nnx.to_pure_dict(nnx.state(Transformer(config.model, rngs=nnx.Rngs(config.train.seed))))
    params = jax.jit(init, out_shardings=shardings)()

  tokenizer = load_tokenizer(config.data.tokenizer)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ConfigError(f"data.tokenizer={config.data.tokenizer!r} has {tokenizer.vocab_size} tokens, more than "
                      f"model.vocab_size={config.model.vocab_size}")
  return Loaded(config, params, plan, tokenizer)


def load_draft(config: Config, plan: ShardingPlan, *, preset: str, overrides: list[str] = (),
               checkpoint: str | None = None, hf: str | None = None) -> Loaded:
  """A draft model for speculative decoding on the served model's devices: the config of `preset`
  with `overrides` (as `--set` gives them) and the served model's mesh, sharding and data sections
  (so its tokenizer); parameters as `load` finds them (a random initialisation without a checkpoint)."""
  draft = get_config(preset, list(overrides))
  draft = dataclasses.replace(draft, mesh=config.mesh, sharding=config.sharding, data=config.data)
  return load(draft, checkpoint=checkpoint, hf=hf, devices=list(plan.mesh.devices.flat))

