"""The one place that talks to Orbax.

Checkpoints live in `<workdir>/checkpoints/<step>/` with two items: `state` (the TrainState,
sharded arrays) and `data` (the input iterator's position, JSON). Orbax writes each checkpoint to
a temporary directory and renames it when complete, so a run killed mid-save leaves the previous
checkpoint as the latest one.
"""

import os
from typing import Optional, Tuple

import orbax.checkpoint as ocp
from absl import logging


def make_manager(workdir: str, max_to_keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_state: dict) -> None:
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=ocp.args.JsonSave(data_state)), force=True)


def restore_latest(manager: ocp.CheckpointManager, abstract_state,
                   with_data: bool = True) -> Optional[Tuple[object, Optional[dict]]]:
  """(state laid out like `abstract_state`, data-iterator state) of the latest checkpoint, or None.

  `with_data=False` reads only the state (sampling and evaluation need no data position).
  """
  step = manager.latest_step()
  if step is None:
    return None
  logging.info("Restoring checkpoint %d from %s", step, manager.directory)
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if with_data:
    items["data"] = ocp.args.JsonRestore()
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError) as e:
    raise ValueError(f"checkpoint {manager.directory}/{step} does not match this config's "
                     f"model: {e}") from e
  return restored["state"], (restored["data"] if with_data else None)
