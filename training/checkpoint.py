"""Asynchronous sharded checkpoints with Orbax: save every N steps, resume from the last good one,
and load just the parameters of a checkpoint onto any mesh.

Orbax writes each checkpoint into a temporary directory and renames it only once every process has
finished, so a run killed mid-save leaves the previous checkpoints untouched, and old ones are
deleted only after a newer one is complete. Each checkpoint holds three items: `state` (the train
state pytree), `data` (the data iterator's position) and `config` (the run's config as JSON).

Restoring takes the abstract state of the *current* run, whose shardings may come from another
mesh: Orbax reads each array straight into the new layout (elastic restore with the same global
batch). Before reading any array, the saved shapes are compared with the current run's:

- a checkpoint whose arrays do not match (the model or optimizer changed) raises
  `CheckpointMismatch`, naming the config fields that differ, and nothing is touched;
- a checkpoint that cannot be read (truncated or corrupt files) is renamed `<step>.unreadable`
  and the next older one is tried.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from configs import CheckpointConfig, Config, ConfigError

log = logging.getLogger(__name__)


class CheckpointMismatch(ConfigError):
  """A readable checkpoint whose arrays do not fit the current configuration."""


def _manager(directory: str, cfg: CheckpointConfig | None = None, state_handler=None) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep if cfg else None, create=cfg is not None,
                                         enable_async_checkpointing=bool(cfg and cfg.async_save))
  handlers = {"state": state_handler or ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
              "config": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=handlers)


def _flat(tree: Any) -> dict[str, tuple]:
  """'a/b/0' -> (shape, dtype) of every array leaf; sequences of any kind are keyed by position."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]:
    keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    out["/".join(keys)] = (tuple(leaf.shape), str(leaf.dtype))
  return out


def _layout_differences(saved: Any, current: Any) -> list[str]:
  """Arrays whose shape or dtype differ, or that exist on one side only. Parameters are compared
  by path; optimizer state by position (Orbax stores named tuples as plain sequences)."""
  diffs = []
  a, b = _flat(saved.get("params", {})), _flat(current["params"])
  for key in sorted(set(a) | set(b)):
    if a.get(key) != b.get(key):
      show = lambda v: "absent" if v is None else f"{list(v[0])} {v[1]}"
      diffs.append(f"params/{key}: {show(a.get(key))} in the checkpoint, {show(b.get(key))} now")
  opt_a, opt_b = list(_flat(saved.get("opt_state", {})).values()), list(_flat(current["opt_state"]).values())
  if opt_a != opt_b:
    diffs.append(f"opt_state: {len(opt_a)} arrays in the checkpoint, {len(opt_b)} now"
                 + ("" if len(opt_a) != len(opt_b) else " (shapes or dtypes differ)"))
  return diffs


def _config_differences(saved: dict | None, config: Config, sections: tuple[str, ...]) -> list[str]:
  """Fields of `sections` (those that decide the state's arrays) that differ from the saved config."""
  if not saved:
    return []
  now = config.to_dict()
  out = []
  for section in sections:
    for name, value in now[section].items():
      old = saved.get(section, {}).get(name, value)
      if isinstance(value, tuple):
        old = tuple(old) if isinstance(old, list) else old
      if old != value:
        out.append(f"{section}.{name}={old!r} in the checkpoint, {value!r} now")
  return out


class Checkpointer:
  """Saves and restores {"state": train state, "data": data-iterator state, "config": config}."""

  def __init__(self, directory: str, cfg: CheckpointConfig):
    self.cfg = cfg
    self.directory = os.path.abspath(directory)
    self.manager = _manager(directory, cfg)

  def due(self, step: int) -> bool:
    return step % self.cfg.every == 0

  def save(self, step: int, state: Any, data_state: dict, config: Config) -> None:
    """Starts saving (returns once the arrays are snapshotted; files are written in the background)."""
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    data=ocp.args.JsonSave(data_state),
                                                    config=ocp.args.JsonSave(config.to_dict())), force=True)

  def restore_latest(self, abstract_state: Any, config: Config) -> tuple[int, Any, dict] | None:
    """(step, state, data_state) of the newest readable checkpoint, or None if there is none.

    Raises `CheckpointMismatch` (touching nothing) if the newest readable checkpoint's arrays do
    not fit `abstract_state`.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        saved = self.manager.item_metadata(step)["state"].tree
      except Exception as err:  # noqa: BLE001 - unreadable metadata is a corrupt checkpoint
        self._set_aside(step, err)
        continue
      check_fits(self.directory, step, saved, self._saved_config(step), abstract_state, config)
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      except Exception as err:  # noqa: BLE001 - any unreadable checkpoint falls back to an older one
        self._set_aside(step, err)
        continue
      return step, restored["state"], dict(restored["data"])
    return None

  def _saved_config(self, step: int) -> dict | None:
    try:
      return dict(self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])
    except Exception:  # noqa: BLE001 - checkpoints of older versions have no config item
      return None

  def _set_aside(self, step: int, err: Exception) -> None:
    """Renames an unreadable checkpoint so the resumed run can save that step again."""
    log.warning("checkpoint at step %d in %s is unreadable (%s: %s); moved it to %d.unreadable "
                "and trying an older one", step, self.directory, type(err).__name__, err, step)
    if jax.process_index() == 0:
      path = os.path.join(self.directory, str(step))
      os.rename(path, f"{path}.unreadable")
    multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def check_fits(directory: str, step: int, saved_tree: Any, saved_config: dict | None, abstract: Any,
               config: Config) -> None:
  """Raises `CheckpointMismatch` if the saved arrays differ from `abstract`'s (a train state, or
  {"params": ...} alone), naming the config fields that differ and the first arrays."""
  current = abstract if "opt_state" in abstract else {**abstract, "opt_state": {}}
  saved = saved_tree if "opt_state" in abstract else {"params": saved_tree.get("params", {}), "opt_state": {}}
  arrays = _layout_differences(saved, current)
  if not arrays:
    return
  sections = ("model", "optimizer") if "opt_state" in abstract else ("model",)
  fields = _config_differences(saved_config, config, sections)
  what = ("; ".join(fields[:8]) + ("; ..." if len(fields) > 8 else "")) if fields else "; ".join(arrays[:4])
  raise CheckpointMismatch(
      f"the checkpoint at step {step} in {directory} does not fit this configuration: {what}. Nothing "
      f"was changed. Resume with the checkpoint's settings, or train in a new workdir.")


def checkpoint_dir(path: str) -> str:
  """A run's workdir or its checkpoints/ folder -> the checkpoints folder."""
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def _finished(path: str, state_handler=None) -> tuple[str, ocp.CheckpointManager, list[int]]:
  """(checkpoints folder, its manager (the caller closes it), finished steps, at least one) of a run's
  workdir or checkpoints/ folder."""
  directory = checkpoint_dir(path)
  if not os.path.isdir(directory):
    raise ConfigError(f"no checkpoints at {path}: expected a run's workdir or its checkpoints folder")
  manager = _manager(directory, state_handler=state_handler)
  steps = sorted(manager.all_steps())
  if not steps:
    manager.close()
    raise ConfigError(f"no finished checkpoint in {directory}")
  return directory, manager, steps


def saved_run_config(path: str) -> dict:
  """The config (as `Config.to_dict` wrote it) saved with the newest checkpoint of a run (its workdir
  or its checkpoints/ folder)."""
  directory, manager, steps = _finished(path)
  try:
    try:
      return dict(manager.restore(steps[-1], args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])
    except Exception as err:  # noqa: BLE001 - older checkpoints have no config item
      raise ConfigError(f"the checkpoint at step {steps[-1]} in {directory} holds no config") from err
  finally:
    manager.close()


def restore_params(path: str, abstract_params: Any, config: Config, step: int | None = None) -> tuple[int, Any]:
  """Just the parameters of a checkpoint, laid out as `abstract_params` (any mesh); no optimizer state.

  Args:
    path: a run's workdir or its checkpoints/ folder.
    abstract_params: ShapeDtypeStructs with shardings (`setup.abstract_state["params"]`).
    config: the current config, to name the fields that differ if the shapes do not fit.
    step: which checkpoint; default the newest.
  Returns (step, params). For evaluation, fine-tuning (`checkpoint.init_params_from`), serving and
  Hugging Face export (`models.hf_llama.save_hf_checkpoint(dir, config.model, params)`).
  """
  directory, manager, steps = _finished(path, ocp.PyTreeCheckpointHandler())
  try:
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise ConfigError(f"no checkpoint at step {step} in {directory} (steps: {steps})")
    saved = manager.item_metadata(step)["state"].tree
    saved_config = None
    try:
      saved_config = dict(manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])
    except Exception:  # noqa: BLE001 - older checkpoints have no config item
      pass
    check_fits(directory, step, saved, saved_config, {"params": abstract_params}, config)
    target = {"params": abstract_params}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
    return step, restored["state"]["params"]
  finally:
    manager.close()
