"""The one place semflow_jax reads and writes files: local paths and bucket URLs alike.

Every path a user gives (workdir, init_from, --input/--output, converter output) may be a local
path or a URL such as `gs://bucket/run`. Everything goes through etils `epath` (what Orbax and
tfds use too), so a bucket path is never mistaken for a relative local one. Writes are atomic:
the data goes to a temporary name beside the target and is then moved into place (a rename on a
local disk, copy-then-delete on object storage), so a reader never sees half a file under its
final name.
"""

import json
import os
import uuid
from typing import Any, Union

from etils import epath

PathLike = Union[str, os.PathLike]


def is_url(path: PathLike) -> bool:
  """True for `scheme://...` paths (gs://, s3://, ...)."""
  return "://" in os.fspath(path)


def resolve(path: PathLike) -> str:
  """An absolute local path, or the URL unchanged (never `<cwd>/gs:/...`)."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(os.path.expanduser(path))


def as_path(path: PathLike) -> epath.Path:
  return epath.Path(resolve(path))


def join(base: PathLike, *parts: str) -> str:
  return os.fspath(as_path(base).joinpath(*parts))


def exists(path: PathLike) -> bool:
  return as_path(path).exists()


def is_dir(path: PathLike) -> bool:
  return as_path(path).is_dir()


def is_file(path: PathLike) -> bool:
  return as_path(path).is_file()


def makedirs(path: PathLike) -> None:
  as_path(path).mkdir(parents=True, exist_ok=True)


def listdir(path: PathLike) -> list:
  return sorted(p.name for p in as_path(path).iterdir())


def read_bytes(path: PathLike) -> bytes:
  return as_path(path).read_bytes()


def read_text(path: PathLike) -> str:
  return as_path(path).read_text()


def write_bytes(path: PathLike, data: bytes) -> None:
  """Atomically write `data` to `path`, creating its parent directories."""
  target = as_path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  temporary = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    temporary.write_bytes(data)
    temporary.replace(target)
  finally:
    if temporary.exists():
      temporary.unlink()


def write_text(path: PathLike, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any) -> None:
  """Strict JSON (NaN and infinity are refused: write None for a missing number)."""
  write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def remove_tree(path: PathLike) -> None:
  target = as_path(path)
  if target.is_dir():
    target.rmtree()
  elif target.exists():
    target.unlink()
