"""The one place semflow_jax reads and writes files: local paths and bucket URLs alike.

Every path a user gives (workdir, init_from, --input/--output, the converter's output) may be a
local path or a URL such as `gs://bucket/run`. Everything goes through etils `epath`, which Orbax
and tfds use too, so a bucket path is never mistaken for a relative local one (`<cwd>/gs:/...`).

Backends: where TensorFlow is installed (always, here) `epath` reaches gs:// through TensorFlow's
GCS client, the one tf.data and TensorBoard use too; `EPATH_USE_TF=false` switches `epath` to
fsspec/gcsfs (which honours `STORAGE_EMULATOR_HOST`; the tests use that with a GCS server on
localhost). Orbax writes array data through tensorstore's own GCS client either way.

Writes are atomic: the data goes to a temporary name beside the target and is then moved into
place (a rename on a local disk; on object storage, which has no rename, a copy then a delete), so
a reader never sees half a file under its final name. Object stores have no directories, so
`makedirs` does nothing there (and never creates a bucket).

`check` is the preflight run before any work: it turns missing credentials, a missing bucket or a
storage service that does not answer into one `StorageError` line naming the path.
"""

import contextlib
import json
import os
import shutil
import tempfile
import threading
import uuid
from typing import Any, Iterable, Iterator, List, Optional, Tuple, Union

from etils import epath

PathLike = Union[str, os.PathLike]

# Seconds the preflight waits for the storage service (gcsfs retries a refused connection for
# about a minute before it gives up); SEMFLOW_STORAGE_TIMEOUT_S overrides it.
CHECK_TIMEOUT_S = 60.0


class StorageError(OSError):
  """A path that cannot be used: its one-line message names the path and the problem."""


def is_url(path: PathLike) -> bool:
  """True for `scheme://...` paths (gs://, s3://, ...)."""
  return "://" in os.fspath(path)


def resolve(path: PathLike) -> str:
  """An absolute local path, or the URL normalised (never `<cwd>/gs:/...`)."""
  path = os.fspath(path)
  return os.fspath(epath.Path(path)) if is_url(path) else os.path.abspath(
      os.path.expanduser(path))


def as_path(path: PathLike) -> epath.Path:
  return epath.Path(resolve(path))


def join(base: PathLike, *parts: str) -> str:
  return os.fspath(as_path(base).joinpath(*parts))


def parent(path: PathLike) -> str:
  return os.fspath(as_path(path).parent)


def exists(path: PathLike) -> bool:
  return as_path(path).exists()


def is_dir(path: PathLike) -> bool:
  return as_path(path).is_dir()


def is_file(path: PathLike) -> bool:
  return as_path(path).is_file()


def makedirs(path: PathLike) -> None:
  """Create a local directory and its parents; nothing on object storage (no directories there,
  and gcsfs would create a missing bucket)."""
  if not is_url(path):
    as_path(path).mkdir(parents=True, exist_ok=True)


def listdir(path: PathLike) -> list:
  return sorted(p.name for p in as_path(path).iterdir())


def read_bytes(path: PathLike) -> bytes:
  return as_path(path).read_bytes()


def read_text(path: PathLike) -> str:
  return as_path(path).read_text()


def read_json(path: PathLike) -> Any:
  return json.loads(read_text(path))


def _temporary_beside(target: epath.Path) -> epath.Path:
  return target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"


def write_bytes(path: PathLike, data: bytes) -> None:
  """Atomically write `data` to `path` (local parent directories are created)."""
  target = as_path(path)
  makedirs(target.parent)
  temporary = _temporary_beside(target)
  try:
    temporary.write_bytes(data)
    if is_url(path):
      # No rename on object storage; an object appears whole when its copy completes.
      temporary.copy(target, overwrite=True)
    else:
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
  """Remove a file or a directory tree; nothing if it does not exist."""
  target = as_path(path)
  if target.is_dir():
    target.rmtree()
  elif target.exists():
    target.unlink()


def staging_dir(final: PathLike) -> str:
  """A fresh directory name beside `final` for building it before `move_tree` puts it in place."""
  target = as_path(final)
  makedirs(target.parent)
  staging = _temporary_beside(target)
  makedirs(staging)
  return os.fspath(staging)


def _files(root: epath.Path) -> Iterator[epath.Path]:
  for child in root.iterdir():
    if child.is_dir():
      yield from _files(child)
    else:
      yield child


def files_under(path: PathLike) -> List[Tuple[str, str]]:
  """Every file below directory `path`, as (its path under `path` with '/', its full path),
  sorted. Built on iterdir: epath's walk() on a bucket through fsspec yields directories
  without their scheme, which relative_to cannot place under `path`."""
  root = as_path(path)
  return sorted((f.relative_to(root).as_posix(), os.fspath(f)) for f in _files(root))


def move_tree(source: PathLike, destination: PathLike) -> None:
  """Move directory `source` to `destination` (which must not exist).

  A rename on a local disk (atomic); on object storage each object is copied, then the source is
  deleted, so readers must check a marker written after the move (see convert.py).
  """
  if not is_url(source) and not is_url(destination):
    os.rename(resolve(source), resolve(destination))
    return
  src, dst = as_path(source), as_path(destination)
  for f in _files(src):
    f.copy(dst / f.relative_to(src), overwrite=True)
  src.rmtree()


@contextlib.contextmanager
def local_copy(path: PathLike, names: Optional[Iterable[str]] = None) -> Iterator[str]:
  """A local path holding `path`'s content: the path itself if local, else a temporary download
  (for readers that need a local file, e.g. transformers' from_pretrained). For a directory,
  `names` (paths relative to it) limits the download to those files."""
  if not is_url(path):
    yield resolve(path)
    return
  src = as_path(path)
  with tempfile.TemporaryDirectory(prefix="semflow_jax_") as tmp:
    local = os.path.join(tmp, src.name)
    if src.is_dir():
      files = _files(src) if names is None else (src / name for name in names)
      for f in files:
        _download(f, os.path.join(local, os.fspath(f.relative_to(src))))
    else:
      _download(src, local)
    yield local


def _download(src: epath.Path, local: str) -> None:
  os.makedirs(os.path.dirname(local), exist_ok=True)
  with src.open("rb") as source, open(local, "wb") as out:
    shutil.copyfileobj(source, out, 16 << 20)  # streamed: weight files are gigabytes


# -- preflight ---------------------------------------------------------------------------------
def _bucket(url: str) -> str:
  scheme, rest = url.split("://", 1)
  return f"{scheme}://{rest.split('/', 1)[0]}"


def _describe(error: BaseException) -> str:
  """One line for a storage client's exception: what kind of problem, then its own words."""
  text = " ".join(str(error).split()) or type(error).__name__
  lower = f"{type(error).__name__} {text}".lower()
  if any(s in lower for s in ("credential", "401", "unauthenticated", "unauthorized",
                              "invalid_grant", "invalid_token", "access token")):
    kind = "no valid credentials"
  elif any(s in lower for s in ("403", "forbidden", "permission", "access denied")):
    kind = "permission denied"
  elif any(s in lower for s in ("resolve host", "cannot connect", "connection refused",
                                "connect call failed", "timed out", "timeout", "unreachable",
                                "name or service not known", "network")):
    kind = "storage service unreachable"
  elif isinstance(error, FileNotFoundError) or "404" in lower or "not found" in lower:
    kind = "not found"
  else:
    kind = type(error).__name__
  return f"{kind} ({text[:300]})"


def _check_credentials(url: str) -> None:
  """gs:// outside an emulator needs Google credentials; say so now, not at the first write."""
  if not url.startswith("gs://") or os.environ.get("STORAGE_EMULATOR_HOST"):
    return
  try:
    import google.auth
    from google.auth import exceptions
  except ImportError:  # TensorFlow's client then finds (or misses) them itself
    return
  try:
    google.auth.default()
  except exceptions.DefaultCredentialsError as e:
    raise StorageError(
        f"no Google Cloud credentials for {url} ({' '.join(str(e).split())[:200]}); run "
        "`gcloud auth application-default login`, set GOOGLE_APPLICATION_CREDENTIALS, or use a "
        "VM whose service account can use the bucket") from None


def check(path: PathLike, what: str, write: bool = False) -> None:
  """Fail now, in one line naming `what` and `path`, if a bucket path cannot be used.

  Checks credentials, that the bucket exists, and (write=True) that an object can be written
  and deleted beside `path`. Local paths are left to the code that uses them.
  """
  if not path or not is_url(path):
    return
  url = resolve(path)
  label = f"{what}={url}"
  try:
    _check_credentials(url)
  except StorageError as e:
    raise StorageError(f"{label}: {e}") from None

  outcome = {}

  def probe():
    try:
      bucket = _bucket(url)
      try:
        missing = not as_path(bucket).exists()
      except Exception as e:
        # Object roles (e.g. storage.objectAdmin) may not read bucket metadata: the probe of
        # the path below then decides.
        if not _describe(e).startswith("permission denied"):
          raise
        missing = False
      if missing:
        outcome["error"] = StorageError(
            f"{label}: bucket {bucket} does not exist (or these credentials cannot see it)")
        return
      if write:
        marker = as_path(url) / f".semflow_jax_write_check-{uuid.uuid4().hex[:8]}"
        marker.write_bytes(b"")
        marker.unlink()
      else:
        as_path(url).exists()
    except Exception as e:  # whatever the client raises becomes one line
      outcome["error"] = StorageError(f"{label}: {_describe(e)}")

  timeout = float(os.environ.get("SEMFLOW_STORAGE_TIMEOUT_S", CHECK_TIMEOUT_S))
  # A daemon thread: a client stuck in its retries must not keep the process alive.
  thread = threading.Thread(target=probe, daemon=True, name="semflow_jax storage check")
  thread.start()
  thread.join(timeout)
  if thread.is_alive():
    raise StorageError(f"{label}: storage service unreachable (no answer within {timeout:g} s; "
                       "check the network, the bucket name and STORAGE_EMULATOR_HOST if set)")
  if "error" in outcome:
    raise outcome["error"]


def metric_writer(workdir: PathLike, config):
  """clu's metric writer for a run: TensorBoard event files in `workdir` from process 0 when
  `config.train.tensorboard` (default True), else the console only (sweeps and tests).

  Event files are written by TensorFlow's own file system. Where `epath` does not use it
  (`EPATH_USE_TF=false`: files go through fsspec, e.g. to a GCS emulator that TensorFlow's
  client cannot reach) a bucket workdir's events are written to a local directory and uploaded
  through this module after every write (each upload replaces the object whole).
  """
  import jax
  from clu import metric_writers
  enabled = config.train.get("tensorboard", True) and jax.process_index() == 0
  if not (enabled and is_url(workdir) and os.environ.get("EPATH_USE_TF", "").lower()
          in ("false", "0", "no")):
    return metric_writers.create_default_writer(resolve(workdir), just_logging=not enabled)
  local = tempfile.mkdtemp(prefix="semflow_events_")
  return _UploadedEvents(metric_writers.create_default_writer(local), local, resolve(workdir))


class _UploadedEvents:
  """A metric writer whose event files (written to `local`) are copied to `target` after each
  write, at `flush` and at `close` (which also removes `local`)."""

  def __init__(self, writer, local: str, target: str):
    self._writer, self._local, self._target = writer, local, target

  def __getattr__(self, name):
    method = getattr(self._writer, name)
    if not name.startswith("write_"):
      return method

    def write_and_upload(*args, **kwargs):
      result = method(*args, **kwargs)
      self.flush()
      return result
    return write_and_upload

  def _upload(self) -> None:
    for name in os.listdir(self._local):
      with open(os.path.join(self._local, name), "rb") as f:
        write_bytes(join(self._target, name), f.read())

  def flush(self) -> None:
    self._writer.flush()
    self._upload()

  def close(self) -> None:
    self._writer.close()
    self._upload()
    shutil.rmtree(self._local, ignore_errors=True)
