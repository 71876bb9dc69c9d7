"""Asynchronous sharded checkpoints with Orbax: save every N steps, resume from the last good one.

Orbax writes each checkpoint into a temporary directory and renames it only once every process has
finished, so a run killed mid-save leaves the previous checkpoints untouched, and old ones are
deleted only after a newer one is complete. A checkpoint that cannot be read (truncated or corrupt
files) is reported and the next older one is tried. Restoring takes the abstract state of the
*current* run, whose shardings may come from another mesh: Orbax reads each array straight into
the new layout (elastic restore with the same global batch).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from configs import CheckpointConfig

log = logging.getLogger(__name__)


class Checkpointer:
  """Saves and restores {"state": train state pytree, "data": JSON data-iterator state}."""

  def __init__(self, directory: str, cfg: CheckpointConfig):
    self.cfg = cfg
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True,
                                           enable_async_checkpointing=cfg.async_save)
    self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

  def due(self, step: int) -> bool:
    return step % self.cfg.every == 0

  def save(self, step: int, state: Any, data_state: dict) -> None:
    """Starts saving (returns once the arrays are snapshotted; files are written in the background)."""
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    data=ocp.args.JsonSave(data_state)), force=True)

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """(step, state, data_state) of the newest readable checkpoint, or None if there is none."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      except Exception as err:  # noqa: BLE001 - any unreadable checkpoint falls back to an older one
        log.warning("checkpoint at step %d in %s is unreadable (%s: %s); moved it to %d.unreadable "
                    "and trying an older one", step, self.manager.directory, type(err).__name__, err, step)
        self._set_aside(step)
        continue
      return step, restored["state"], dict(restored["data"])
    return None

  def _set_aside(self, step: int) -> None:
    """Renames an unreadable checkpoint so the resumed run can save that step again."""
    if jax.process_index() == 0:
      path = os.path.join(str(self.manager.directory), str(step))
      os.rename(path, f"{path}.unreadable")
    multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
