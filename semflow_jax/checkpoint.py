"""The one place that talks to Orbax: training checkpoints and the converter's weights.

Checkpoints live in `<workdir>/checkpoints/<step>/` with three items: `state` (the TrainState,
sharded arrays, written by every process for its own shards), `data` (the input iterator's
position, JSON) and `model` (what the parameters mean beyond their shapes, JSON: the anchor
palette; a config with another one is refused). Orbax writes each checkpoint to a temporary
directory and renames it when complete, so a run killed mid-save leaves the previous checkpoint
as the latest one; the leftover temporary directory is removed when the next run opens the
manager.
"""

import time
import uuid
from typing import Any, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from semflow_jax import storage


class IncompatibleCheckpointError(ValueError):
  """The workdir's checkpoint was written by a config with a different model."""


_replica_zero_writes = False


def _write_each_shard_from_replica_zero() -> None:
  """Orbax by default splits each replicated array among its replicas, slicing it with a jitted
  op per shape: on 8 devices that compiles for seconds on the first save and blocks the loop for
  about a second on every save. Replica 0 writes each shard instead (FSDP spreads large states
  over processes anyway). Orbax takes this only as a process-wide registration, so it is made
  here, when the first manager that writes is made, never at import."""
  global _replica_zero_writes
  if not _replica_zero_writes:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
    _replica_zero_writes = True


def make_manager(workdir: str, max_to_keep: int, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """`read_only`: for sampling; never writes, and can restore part of the state (`not_read`)."""
  if not read_only:
    _write_each_shard_from_replica_zero()
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                         enable_async_checkpointing=async_save and not read_only,
                                         cleanup_tmp_directories=not read_only,
                                         read_only=read_only)
  # Handlers named up front, so a fresh manager can read a checkpoint's metadata (shapes)
  # before restoring anything. The PyTree handler reads what the Standard one wrote (the
  # Standard one wraps it) and also takes placeholders for leaves not to read.
  state_handler = (ocp.PyTreeCheckpointHandler() if read_only
                   else ocp.StandardCheckpointHandler())
  handlers = {"state": state_handler, "data": ocp.JsonCheckpointHandler(),
              "model": ocp.JsonCheckpointHandler()}
  # A URL directory (gs://...) goes to Orbax as an epath, never through os.path.
  return ocp.CheckpointManager(storage.as_path(storage.join(workdir, "checkpoints")),
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
  try:  # the small JSON item read directly: item_metadata() would read every array's metadata
    saved = manager.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))["model"]
  except KeyError:  # 'Item "model" was not found': written before palettes were recorded
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


def not_read(tree):
  """`tree` with every leaf marked to be left unread in a restore target (Orbax placeholders):
  sampling restores the parameters it uses and never allocates the optimiser state."""
  return jax.tree.map(lambda _: ocp.PLACEHOLDER, tree)


def _path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return "/".join(parts)


_UNREAD = "not read"


def _shapes(tree) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
  return {_path_str(p): (None if x is None else
                         _UNREAD if x is ocp.PLACEHOLDER else tuple(x.shape))
          for p, x in leaves}


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
      if want.get(k) == _UNREAD:
        continue
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
                   with_data: bool = True) -> Optional[Tuple[Any, Optional[dict]]]:
  """(state laid out like `abstract_state`, data-iterator state) of the latest checkpoint, or None.

  `with_data=False` reads only the state (sampling and evaluation need no data position);
  leaves of `abstract_state` marked by `not_read` are not read (they come back as placeholders;
  `manager` must then be `read_only`).
  A checkpoint of another palette (`model_record`) or model shape raises
  IncompatibleCheckpointError before the state is read.
  """
  step = manager.latest_step()
  if step is None:
    return None
  check_model_record(manager, step, model_record)
  check_compatible(manager, step, abstract_state)
  logging.info("Restoring checkpoint %d from %s", step, manager.directory)
  if any(x is ocp.PLACEHOLDER for x in jax.tree.leaves(abstract_state)):  # a read_only manager's
    items = {"state": ocp.args.PyTreeRestore(
        item=abstract_state,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
  else:
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


# -- converted weights (semflow_jax.convert and convert_eval_nets write them; init_from and the ----
# -- evaluation networks read them) ----------------------------------------------------------------
# A conversion directory holds one complete version per conversion, `conversion-<time>-<id>/`
# with `params/` (Orbax) and the converter's JSON files, and the marker `conversion.json`, which
# names the version and is written last. Writing a marker is one atomic write, also on object
# storage, so a reader sees either the previous complete version or the new one, never a mix;
# a conversion that fails (or an --overwrite that fails) leaves the previous version in use.
CONVERTED_MARKER = "conversion.json"
_VERSION_PREFIX = "conversion-"
_BEFORE_VERSIONS = ("params", "unet_config.json", "vae_config.json")  # the layout before versions


class ConversionError(ValueError):
  """Weights that do not fit the model: names the offending keys or files."""


def save_converted(output: str, params, files: dict, record: dict) -> str:
  """Write converted `params` and `files` ({name: JSON}) as a new version of the conversion at
  `output` (local or gs://), commit it by writing the marker (`record` plus the version), then
  remove older versions. Returns the version's directory."""
  version = (f"{_VERSION_PREFIX}{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-"
             f"{uuid.uuid4().hex[:6]}")
  directory = storage.join(output, version)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(storage.as_path(storage.join(directory, "params")), params)
      checkpointer.wait_until_finished()
    for name, content in files.items():
      storage.write_json(storage.join(directory, name), content)
    storage.write_json(storage.join(output, CONVERTED_MARKER), {**record, "version": version})
  except BaseException:  # the marker still names the previous version: this one is no use
    storage.remove_tree(directory)
    raise
  for name in storage.listdir(output):  # superseded versions, and unfinished ones
    if name != version and (name.startswith(_VERSION_PREFIX) or name in _BEFORE_VERSIONS):
      storage.remove_tree(storage.join(output, name))
  return directory


def converted_dir(path: str, what: str, hint: str) -> str:
  """The directory of the complete conversion at `path` (the version its marker names).

  FileNotFoundError naming `what` (e.g. `config.model.init_from=...`) when there is no marker:
  nothing was converted there, or the conversion did not finish. `hint` says how to convert.
  """
  marker = storage.join(path, CONVERTED_MARKER)
  if not storage.exists(marker):
    detail = ("incomplete conversion (no conversion.json: the converter did not finish)"
              if storage.exists(path) else "nothing there")
    raise FileNotFoundError(f"{what}: {detail}; {hint}")
  version = storage.read_json(marker).get("version")
  return storage.join(path, version) if version else storage.resolve(path)


def _stored_tree(params_dir: str):
  """The shapes (Orbax metadata) of the checkpoint at `params_dir`, nothing read."""
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(storage.as_path(params_dir))
  return metadata.item_metadata if hasattr(metadata, "item_metadata") else metadata


def read_params(params_dir: str, abstract, what: str, expected_by: str,
                unrequested_ok=lambda key: False) -> dict:
  """The parameters `abstract` (a tree of ShapeDtypeStructs) asks for, read from the Orbax
  checkpoint at `params_dir` as host numpy arrays, every shape checked first.

  Raises ConversionError starting with `what` and naming (at most 20) keys that are missing,
  stored with another shape than `expected_by` expects, or stored but not asked for (unless
  `unrequested_ok(key)`, key a tuple of names).
  """
  tree = _stored_tree(params_dir)
  stored = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(tree)).items()}  # pyright: ignore[reportAttributeAccessIssue]
  expected = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(abstract)).items()}  # pyright: ignore[reportAttributeAccessIssue]
  problems = [f"{'/'.join(k)}: stored {stored.get(k)}, {expected_by} expects {shape}"
              for k, shape in expected.items() if stored.get(k) != shape]
  problems += [f"{'/'.join(k)}: stored, but {expected_by} has no such parameter"
               for k in stored if k not in expected and not unrequested_ok(k)]
  if problems:
    raise ConversionError(f"{what}:\n  " + "\n  ".join(sorted(problems)[:20]) +
                          (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20
                           else ""))
  target = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), dict(tree))
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(storage.as_path(params_dir), target)
  restored = traverse_util.flatten_dict(restored)
  return traverse_util.unflatten_dict({k: np.asarray(restored[k]) for k in expected})


def load_converted(path: str, abstract_params) -> dict:
  """The converted params that `abstract_params` (SemFlow's param shapes) names, checked.

  Leaves of `abstract_params` that carry a sharding (`state.abstract_params`) are restored
  straight into that layout: each process reads only what its devices hold, with no host copy
  of the whole tree. Leaves without one come back as host numpy arrays. Items of the converted
  checkpoint that the model does not use are not read. Raises ConversionError naming missing
  items and mis-shaped keys, FileNotFoundError for an incomplete or missing conversion.
  """
  params_dir = storage.join(converted_dir(
      path, f"config.model.init_from={path}",
      "convert with python -m semflow_jax.convert (--overwrite to replace what is there)"),
      "params")
  params_dir = storage.as_path(params_dir)
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(params_dir)
    tree = metadata.item_metadata if hasattr(metadata, "item_metadata") else metadata
    tree = dict(getattr(tree, "tree", tree))
    stored = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}  # pyright: ignore[reportAttributeAccessIssue]
    missing_items = sorted(set(abstract_params) - {k[0] for k in stored})
    if missing_items:
      raise ConversionError(f"config.model.init_from={path} has no {missing_items} "
                            f"(it holds {sorted({k[0] for k in stored})}); convert with "
                            "--diffusers_dir to include the VAE and the text embedding")
    expected = {k: tuple(v.shape) for k, v in  # pyright: ignore[reportAttributeAccessIssue]
                traverse_util.flatten_dict(dict(abstract_params)).items()}
    problems = [f"{'/'.join(k)}: stored {stored.get(k)}, the config expects {shape}"
                for k, shape in expected.items() if stored.get(k) != shape]
    if problems:
      raise ConversionError(f"config.model.init_from={path} does not match config.model:\n  " +
                            "\n  ".join(sorted(problems)[:20]) +
                            (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
    wanted = {k: abstract_params[k] for k in abstract_params}
    target = {k: wanted.get(k, not_read(v)) for k, v in tree.items()}
    restore_args = jax.tree.map(_restore_args, target)
    restored = checkpointer.restore(params_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args))
  return {k: restored[k] for k in abstract_params}


def _restore_args(leaf):
  """How one leaf of a restore target comes back: into its sharding, or as host numpy."""
  if leaf is ocp.PLACEHOLDER:
    return ocp.RestoreArgs()
  if getattr(leaf, "sharding", None) is not None:
    return ocp.ArrayRestoreArgs(sharding=leaf.sharding, global_shape=leaf.shape,
                                dtype=leaf.dtype)
  return ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)
