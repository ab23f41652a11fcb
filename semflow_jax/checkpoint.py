"""The one place that talks to Orbax.

Checkpoints live in `<workdir>/checkpoints/<step>/` with three items: `state` (the TrainState,
sharded arrays, written by every process for its own shards), `data` (the input iterator's
position, JSON) and `model` (what the parameters mean beyond their shapes, JSON: the anchor
palette; a config with another one is refused). Orbax writes each checkpoint to a temporary directory and renames it when
complete, so a run killed mid-save leaves the previous checkpoint as the latest one; the
leftover temporary directory is removed when the next run opens the manager.
"""

import os
from typing import Optional, Tuple

import jax
import orbax.checkpoint as ocp
from absl import logging


class IncompatibleCheckpointError(ValueError):
  """The workdir's checkpoint was written by a config with a different model."""


# Orbax by default splits each replicated array among its replicas, slicing it with a jitted op
# per shape: on 8 devices that compiles for seconds on the first save and blocks the loop for
# about a second on every save. Replica 0 writes each shard instead (FSDP spreads large states
# over processes anyway).
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


def make_manager(workdir: str, max_to_keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=async_save,
                                         cleanup_tmp_directories=True)
  # Handlers named up front, so a fresh manager can read a checkpoint's metadata (shapes)
  # before restoring anything.
  handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
              "model": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options, item_handlers=handlers)


def wait_for_all_processes(name: str, timeout_s: int = 1800) -> None:
  """A barrier over JAX's coordination service (no device collective), via Orbax's helper.

  Before the first collective of a run: gloo gives processes only 30 s to meet there, and a
  process that compiled more slowly (or missed the compilation cache) can be later than that.
  """
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(name, timeout=timeout_s)


def save(manager: ocp.CheckpointManager, step: int, state, data_state: dict,
         model_record: dict) -> None:
  """Collective: every process calls it at the same step (each writes its own shards).
  `model_record` is `SemFlow.checkpoint_record()`."""
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=ocp.args.JsonSave(data_state),
                                             model=ocp.args.JsonSave(model_record)), force=True)


# Checkpoints written before the `model` item existed all used the paper's palette.
_RECORD_BEFORE_PALETTES = {"palette": "paper"}


def _describe_palette(record: dict) -> str:
  n = len(record["anchors"]) if "anchors" in record else None
  return f"'{record['palette']}'" + (f" ({n} anchors)" if n is not None else "")


def check_model_record(manager: ocp.CheckpointManager, step: int, wanted: dict) -> None:
  """Raise IncompatibleCheckpointError if the checkpoint was trained with another palette,
  naming both."""
  where = f"{manager.directory}/{step}"
  if "model" in manager.item_metadata(step):
    saved = manager.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))["model"]
  else:
    saved = _RECORD_BEFORE_PALETTES
  same_name = saved.get("palette") == wanted.get("palette")
  if same_name and saved.get("anchors", wanted.get("anchors")) == wanted.get("anchors"):
    return
  detail = "" if not same_name else " (same name, different anchor colours)"
  raise IncompatibleCheckpointError(
      f"checkpoint {where} was trained with palette {_describe_palette(saved)}, but this config "
      f"has config.model.palette={_describe_palette(wanted)}{detail}: its anchors would decode "
      "to the wrong classes. Use the palette it was trained with, or a new --workdir; the "
      "checkpoint is left untouched.")


def _path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return "/".join(parts)


def _shapes(tree) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
  return {_path_str(p): (None if x is None else tuple(x.shape)) for p, x in leaves}


def check_compatible(manager: ocp.CheckpointManager, step: int, abstract_state) -> None:
  """Raise IncompatibleCheckpointError naming the first parameter whose shape differs."""
  where = f"{manager.directory}/{step}"
  saved = manager.item_metadata(step)["state"]
  saved = _shapes(getattr(saved, "tree", saved))
  wanted = _shapes(abstract_state)
  for group in ("params", "ema_params"):
    have = {k: v for k, v in saved.items() if k == group or k.startswith(group + "/")}
    want = {k: v for k, v in wanted.items() if k == group or k.startswith(group + "/")}
    for k in sorted(set(have) | set(want)):
      if k not in have:
        problem = "is missing from the checkpoint"
      elif k not in want:
        problem = "is in the checkpoint but not in this config's model"
      elif have[k] != want[k]:
        problem = f"has shape {have[k]} in the checkpoint, {want[k]} in this config"
      else:
        continue
      raise IncompatibleCheckpointError(
          f"checkpoint {where} was written for a different model: parameter {k} {problem}. "
          "Use the config it was trained with, or a new --workdir; the checkpoint is left "
          "untouched.")


def restore_latest(manager: ocp.CheckpointManager, abstract_state, model_record: dict,
                   with_data: bool = True) -> Optional[Tuple[object, Optional[dict]]]:
  """(state laid out like `abstract_state`, data-iterator state) of the latest checkpoint, or None.

  `with_data=False` reads only the state (sampling and evaluation need no data position).
  A checkpoint of another palette (`model_record`) or model shape raises
  IncompatibleCheckpointError before the state is read.
  """
  step = manager.latest_step()
  if step is None:
    return None
  check_model_record(manager, step, model_record)
  check_compatible(manager, step, abstract_state)
  logging.info("Restoring checkpoint %d from %s", step, manager.directory)
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if with_data:
    items["data"] = ocp.args.JsonRestore()
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError) as e:
    raise IncompatibleCheckpointError(
        f"checkpoint {manager.directory}/{step} does not match this config's train state "
        f"(optimiser or EMA settings?): {e}") from e
  return restored["state"], (restored["data"] if with_data else None)
