"""The one place that talks to Orbax.

Checkpoints live in `<workdir>/checkpoints/<step>/`; Orbax writes each one to a temporary
directory and renames it when complete, so a run killed mid-save leaves the previous checkpoint
as the latest one.
"""

import os

import orbax.checkpoint as ocp
from absl import logging


def make_manager(workdir: str, max_to_keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


def save(manager: ocp.CheckpointManager, step: int, state) -> None:
  manager.save(step, args=ocp.args.StandardSave(state), force=True)


def restore_latest(manager: ocp.CheckpointManager, abstract_state):
  """The latest checkpoint laid out like `abstract_state` (shapes, dtypes, shardings), or None."""
  step = manager.latest_step()
  if step is None:
    return None
  logging.info("Restoring checkpoint %d from %s", step, manager.directory)
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except (ValueError, KeyError) as e:
    raise ValueError(f"checkpoint {manager.directory}/{step} does not match this config's "
                     f"model: {e}") from e


