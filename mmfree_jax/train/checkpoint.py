"""Orbax checkpoints: train state + data-iterator state + config, async saves, keep-last-K, exact resume.

Layout: `WORKDIR/checkpoints/<step>/{state,data,config}`. Restoring reads the state into the abstract state
of the current run, with the current shardings, so a checkpoint restores onto any mesh or device count.
A checkpoint that fails to restore (corrupt, truncated) is moved to `WORKDIR/checkpoints_corrupt/` with a
warning and the previous one is used; Orbax writes into temporary directories and renames on commit, so an interrupted save never looks
like a checkpoint.
"""

import json
import os
import shutil
import time
from typing import Any

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from mmfree_jax.model_config import IMPLEMENTATION_FIELDS

CONFIG_FIELDS_THAT_MUST_MATCH = ("model",)


class Checkpointer:
  def __init__(self, workdir: str, ckpt_cfg):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(ckpt_cfg.keep) or None, keep_period=int(ckpt_cfg.keep_period) or None,
        enable_async_checkpointing=bool(ckpt_cfg.async_save), cleanup_tmp_directories=True, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=dict(
        state=ocp.StandardCheckpointHandler(), data=grain.checkpoint.CheckpointHandler(),
        config=ocp.JsonCheckpointHandler()))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def saved_config(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def save(self, step: int, state, data_iter, config_dict: dict[str, Any], force: bool = False) -> bool:
    return self.manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
        config=ocp.args.JsonSave(config_dict)))

  def restore_latest(self, abstract_state, data_iter):
    """(step, state) of the newest checkpoint that restores; data_iter is restored in place. None if none."""
    for step in reversed(self.steps()):
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iter)))
        return step, out["state"]
      except Exception as e:  # pylint: disable=broad-except
        aside = self._set_aside(step)
        logging.warning("checkpoint at step %d could not be restored (%s: %s); moved to %s",
                        step, type(e).__name__, str(e).splitlines()[0] if str(e) else "", aside)
        print(f"WARNING: checkpoint {step} in {self.directory} is corrupt or incomplete "
              f"({type(e).__name__}); moved it to {aside} and falling back to the previous one", flush=True)
    return None

  def _set_aside(self, step: int) -> str:
    """Move a checkpoint that does not restore out of the way (kept for inspection, never deleted)."""
    aside = os.path.join(os.path.dirname(self.directory), "checkpoints_corrupt", f"{step}-{int(time.time())}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(aside), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), aside)
    multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    self.manager.reload()
    return aside

  def check_compatible(self, config_dict: dict[str, Any]) -> None:
    """Refuse a workdir whose checkpoints hold a different model (before anything is written); how the model is
    computed (`model_config.IMPLEMENTATION_FIELDS`) may change between runs."""
    what = lambda d: {k: v for k, v in (d or {}).items() if k not in IMPLEMENTATION_FIELDS}
    for step in reversed(self.steps()):
      try:
        saved = self.saved_config(step)
      except Exception:  # pylint: disable=broad-except
        continue
      for field in CONFIG_FIELDS_THAT_MUST_MATCH:
        old, new = what(saved.get(field)), what(config_dict.get(field))
        if json.dumps(old, sort_keys=True) != json.dumps(new, sort_keys=True):
          diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
          raise ValueError(f"{self.directory} holds a checkpoint of a different {field} (differs in {diff}); "
                           "use a new --workdir or the config it was trained with")
      return

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
