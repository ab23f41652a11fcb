"""Datasets stored for random access: ArrayRecord files, built in shards, committed at once.

Every builder of this package derives from `RandomAccessBuilder`: it lists its examples as
`split_items(manual_dir)` ({split: [item]}, in a fixed order) and loads one with
`load_example(item)`. Example i of a split is always `load_example(items[i])`, however the
dataset was built, and is stored in ArrayRecord files (`group_size:1`), which
`tfds.data_source` / `builder.as_data_source` read by index.

`build` writes a dataset in shards of `examples_per_shard` consecutive items. The shards can
be written by several local processes (`processes`) and by several machines (`num_workers`,
`worker_index`, e.g. the hosts of a TPU slice writing to one bucket): each writes its shards
into a staging directory beside the dataset (`<config dir>/incomplete.shards_<version>`) and
marks each finished shard with a small JSON file. Worker 0 then waits for every shard and
commits: it writes the tfds metadata and moves the staging directory into place (a rename on a
local disk; on object storage the files are copied and `dataset_info.json`, which tfds needs to
see a dataset, comes last). Until the commit nothing looks like a dataset; a build that is
killed leaves only the staging directory, and running it again writes only the shards that are
missing. Bad input (`manual.DataError`) removes the staging directory: nothing is left behind.

`prepare` makes sure a dataset is built exactly once when several processes start on one data
dir at the same moment: on a local disk (or NFS) the first takes a lock file and builds while
the others wait for the lock and then find the dataset; on object storage, where there are no
locks, the caller names the one process that builds (`builds=...`) and the others wait for
the commit.
"""

import bisect
import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from semflow_jax import storage

FILE_FORMAT = "array_record"
EXAMPLES_PER_SHARD = 1000
# One record per chunk (random access), uncompressed: JPEG and PNG payloads do not shrink, and
# zstd would cost a Cityscapes record 0.6 ms of CPU on every read.
WRITER_OPTIONS = "group_size:1,uncompressed"
# Read the footer (the records' index) with a 64 KiB read instead of ArrayRecord's default
# 1 MiB, which a process touching many shards once would pay per shard.
READER_OPTIONS = "readahead_buffer_size:0,footer_prefetch_bytes:65536"
# Bytes per file read (ArrayRecord's data source's choice): a larger buffer reads that much
# around every record (a 1 MiB buffer reads 0.5 MB per 55 KB CelebAMask-HQ record).
READ_BUFFER = 32 << 10
_DONE_DIR = ".shards_done"  # inside the staging directory, removed before the commit
_PLAN_FILE = "plan.json"


class RandomAccessBuilder(tfds.core.GeneratorBasedBuilder):
  """A tfds builder whose split `s` is `[load_example(item) for item in split_items(..)[s]]`.

  Stored as ArrayRecord in item order (also through tfds' own `download_and_prepare`).
  """

  # Load examples on a few threads in `_generate_examples` (file decoding releases the GIL).
  LOAD_IN_THREADS = True

  def __init__(self, *, file_format=None, **kwargs):
    super().__init__(file_format=file_format, **kwargs)
    # A dataset already in the data dir keeps the format it was written in (an old TFRecord
    # build is then refused by name, pipeline.get_builder); a new one is ArrayRecord.
    if file_format is None and not (epath.Path(self.data_path) / "dataset_info.json").exists():
      self.info.set_file_format(FILE_FORMAT, override=True)

  def split_items(self, manual_dir: Optional[str]) -> Dict[str, Sequence]:
    """{split: items}; example i of the split is `load_example(items[i])`."""
    raise NotImplementedError

  def load_example(self, item) -> tuple:
    """(key, feature dict) of one item."""
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    manual_dir = dl_manager.manual_dir if self.MANUAL_DOWNLOAD_INSTRUCTIONS else None
    return {split: self._generate_examples(items)
            for split, items in self.split_items(manual_dir).items()}

  def _generate_examples(self, items):
    yield from load_examples(self, items)


def load_examples(builder: RandomAccessBuilder, items: Sequence) -> Iterator[tuple]:
  """builder.load_example over items, in order (on threads where the builder allows)."""
  if not builder.LOAD_IN_THREADS:
    for item in items:
      yield builder.load_example(item)
    return
  from semflow_jax.data import manual
  yield from manual.ordered_map(builder.load_example, items)


def is_array_record(builder) -> bool:
  return builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD


def stored_versions(builder) -> List[str]:
  """Versions of this builder (and config) prepared in its data dir, other than the code's."""
  config_dir = epath.Path(builder.data_path).parent
  if not config_dir.exists():
    return []
  return sorted(p.name for p in config_dir.iterdir()
                if p.name != builder.data_path.name and (p / "dataset_info.json").exists())


class Records:
  """The serialized examples of one split by index: `len`, `[i]`, `__getitems__(indices)`.

  One ArrayRecord reader per file, opened on first use. On a local disk (or a mount) records
  are read one at a time: ArrayRecord's batched read costs 3-4x the CPU per large record. On
  object storage, where each read waits for a round trip, the batched read fetches a file's
  records in parallel.
  """

  def __init__(self, builder, split: str):
    info = builder.info.splits[split]
    self._open([(os.fspath(f.filename), f.skip, f.take) for f in info.file_instructions], split,
               storage.is_url(os.fspath(builder.data_path)))

  @classmethod
  def of_files(cls, files: Sequence[tuple], split: str) -> "Records":
    """Records of ArrayRecord files [(path, number of records)], in order (cached latents)."""
    records = cls.__new__(cls)
    records._open([(os.fspath(path), 0, count) for path, count in files], split,
                  any(storage.is_url(path) for path, _ in files))
    return records

  def _open(self, files, split, remote):
    self.split = split
    self._files = files
    self._ends = list(itertools.accumulate(take for _, _, take in self._files))
    self._readers: List[Any] = [None] * len(self._files)
    self._lock = threading.Lock()
    self.remote = remote

  def __len__(self) -> int:
    return self._ends[-1] if self._ends else 0

  def _locate(self, index: int):
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} of {self.split} (which has {len(self)})")
    f = bisect.bisect_right(self._ends, index)
    return f, index - (self._ends[f - 1] if f else 0) + self._files[f][1]

  def _reader(self, f: int):
    if self._readers[f] is None:
      from array_record.python import array_record_module  # pyright: ignore[reportAttributeAccessIssue]
      with self._lock:
        if self._readers[f] is None:
          self._readers[f] = array_record_module.ArrayRecordReader(
              self._files[f][0], options=READER_OPTIONS, file_reader_buffer_size=READ_BUFFER)
    return self._readers[f]

  def __getitem__(self, index: int) -> bytes:
    f, position = self._locate(int(index))
    return self._reader(f).read([position])[0]

  def __getitems__(self, indices: Sequence[int]) -> List[bytes]:
    if not self.remote:
      return [self[i] for i in indices]
    by_file: Dict[int, list] = {}
    for n, index in enumerate(indices):
      f, position = self._locate(int(index))
      by_file.setdefault(f, []).append((position, n))
    out = [b""] * len(indices)
    for f, wanted in by_file.items():
      for (_, n), record in zip(wanted, self._reader(f).read([p for p, _ in wanted])):
        out[n] = record
    return out


def reload(builder):
  """A fresh builder object for the same dataset, config and data dir (reads what is there now)."""
  return type(builder)(data_dir=os.fspath(builder.data_dir_root),
                       config=builder.builder_config)


# -- the sharded build ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Shard:
  split: str
  index: int       # within the split
  num_shards: int  # of the split
  start: int       # items [start, stop) of the split
  stop: int

  @property
  def name(self) -> str:
    return f"{self.split}-{self.index:05d}-of-{self.num_shards:05d}"


def plan_shards(items: Dict[str, Sequence], examples_per_shard: int,
                min_shards: int = 1) -> List[Shard]:
  """Every split in shards of at most `examples_per_shard` consecutive items (at least
  `min_shards` per split where it has that many items), in split order."""
  shards = []
  for split, split_items in items.items():
    n = len(split_items)
    count = max(1, min(n, max(min_shards, -(-n // examples_per_shard))))
    bounds = [round(i * n / count) for i in range(count + 1)]
    shards += [Shard(split, i, count, bounds[i], bounds[i + 1]) for i in range(count)]
  return shards


def _filename(builder, data_dir, split: str) -> tfds.core.ShardedFileTemplate:
  return tfds.core.ShardedFileTemplate(data_dir=epath.Path(data_dir), dataset_name=builder.name,
                                       split=split, filetype_suffix=FILE_FORMAT)


def _shard_path(builder, data_dir, shard: Shard) -> epath.Path:
  return _filename(builder, data_dir, shard.split).sharded_filepath(
      shard_index=shard.index, num_shards=shard.num_shards)


def staging_dir(builder) -> epath.Path:
  final = epath.Path(builder.data_path)
  return final.parent / f"incomplete.shards_{final.name}"


def write_shard(builder, shard: Shard, items: Sequence, staging) -> dict:
  """Load `items` (the shard's), write them to the shard's file, then mark it done."""
  from array_record.python import array_record_module  # pyright: ignore[reportAttributeAccessIssue]
  path = _shard_path(builder, staging, shard)
  # ArrayRecord's writer opens local files only (its reader has a GCS client, its writer
  # fails with "open() failed" on gs://): a bucket's shard is written locally, then uploaded.
  remote = storage.is_url(os.fspath(path))
  local_dir = tempfile.mkdtemp(prefix="semflow_shard_") if remote else None
  local = os.path.join(local_dir, path.name) if local_dir else os.fspath(path)
  count = 0
  try:
    writer = array_record_module.ArrayRecordWriter(local, WRITER_OPTIONS)
    try:
      for _, example in load_examples(builder, items):
        writer.write(builder.info.features.serialize_example(example))
        count += 1
    finally:
      writer.close()
    num_bytes = os.path.getsize(local)
    if remote:
      epath.Path(local).copy(path, overwrite=True)
  finally:
    if remote:
      shutil.rmtree(local_dir, ignore_errors=True)
  done = {"split": shard.split, "index": shard.index, "num_shards": shard.num_shards,
          "num_examples": count, "num_bytes": num_bytes}
  storage.write_json(os.fspath(epath.Path(staging) / _DONE_DIR / f"{shard.name}.json"), done)
  return done


def _write_shard_in_child(builder_class, config, data_dir_root, shard, items, staging):
  """One shard in a worker process (the builder is made anew there)."""
  builder = builder_class(data_dir=data_dir_root, config=config)
  return write_shard(builder, shard, items, staging)


def _fingerprint(items: Dict[str, Sequence]) -> str:
  digest = hashlib.sha256()
  for split, split_items in items.items():
    digest.update(split.encode())
    for item in split_items:
      digest.update(repr(item).encode())
  return digest.hexdigest()


def _done(staging) -> Dict[str, dict]:
  done_dir = epath.Path(staging) / _DONE_DIR
  if not done_dir.exists():
    return {}
  return {p.name[:-len(".json")]: json.loads(p.read_text()) for p in done_dir.iterdir()
          if p.name.endswith(".json")}


def build(builder, manual_dir: Optional[str] = None, *, processes: int = 1,
          num_workers: int = 1, worker_index: int = 0,
          examples_per_shard: int = EXAMPLES_PER_SHARD, wait_s: float = 24 * 3600,
          log: Callable[[str], None] = logging.info):
  """Build `builder`'s dataset (see the module docstring); returns the prepared builder (worker
  0) or None (other workers, once their shards are written).

  Shards s = 0, 1, ... (over all splits) belong to worker s % num_workers; each worker writes
  its missing shards on `processes` local processes. Raises manual.DataError (after removing
  the staging directory) on bad input.
  """
  if builder.is_prepared():
    return builder
  if not 0 <= worker_index < num_workers or processes < 1:
    raise ValueError(f"worker {worker_index} of {num_workers} with {processes} processes")
  from semflow_jax.data import manual
  staging = staging_dir(builder)
  try:
    items = builder.split_items(manual_dir)
    shards = plan_shards(items, examples_per_shard, min_shards=num_workers * processes)
    plan = {"dataset": builder.info.full_name, "fingerprint": _fingerprint(items),
            "shards": [dataclasses.asdict(s) for s in shards]}
    _start_or_resume(staging, plan, num_workers)
    done = _done(staging)
    mine = [s for i, s in enumerate(shards) if i % num_workers == worker_index
            and s.name not in done]
    if mine:
      log(f"{builder.name}: writing {len(mine)} of {len(shards)} shards in {staging}"
          + (f" on {processes} processes" if processes > 1 else ""))
    _write_shards(builder, mine, items, staging, processes)
  except manual.DataError:
    storage.remove_tree(os.fspath(staging))
    raise
  if worker_index != 0:
    log(f"{builder.name}: worker {worker_index} wrote its shards; worker 0 commits the dataset")
    return None
  done = wait_for_shards(f"{builder.name} ({staging})", lambda: _done(staging), shards, wait_s,
                         log)
  return commit(builder, staging, shards, done)


def _start_or_resume(staging, plan: dict, num_workers: int) -> None:
  plan_path = epath.Path(staging) / _PLAN_FILE
  if plan_path.exists():
    previous = json.loads(plan_path.read_text())
    if previous == plan:
      return
    if num_workers > 1:
      raise RuntimeError(f"{staging} holds an interrupted build of different shards or "
                         "input; remove it, or rerun with the flags and files it was started "
                         "with")
    logging.info("%s: an interrupted build of different input; starting over", staging)
    storage.remove_tree(os.fspath(staging))
  storage.makedirs(os.fspath(epath.Path(staging) / _DONE_DIR))
  storage.write_json(os.fspath(plan_path), plan)


def _write_shards(builder, shards: List[Shard], items, staging, processes: int) -> None:
  if processes == 1 or len(shards) <= 1:
    for shard in shards:
      write_shard(builder, shard, items[shard.split][shard.start:shard.stop], staging)
    return
  import concurrent.futures
  import multiprocessing
  # Spawned, not forked: the parent has TensorFlow's threads running.
  context = multiprocessing.get_context("spawn")
  pool = concurrent.futures.ProcessPoolExecutor(min(processes, len(shards)), mp_context=context)
  try:
    futures = [pool.submit(_write_shard_in_child, type(builder), builder.builder_config,
                           os.fspath(builder.data_dir_root), shard,
                           list(items[shard.split][shard.start:shard.stop]), os.fspath(staging))
               for shard in shards]
    for future in futures:
      future.result()  # the first error (e.g. manual.DataError) is raised here
  finally:
    # On an error: no new shards; the running ones finish before the caller cleans up.
    pool.shutdown(wait=True, cancel_futures=True)


def wait_for_shards(name: str, read_done: Callable[[], Dict[str, dict]], shards, wait_s: float,
                    log: Callable[[str], None]) -> Dict[str, dict]:
  """{shard name: done record} once `read_done()` lists every one of `shards` (the other workers
  write theirs); `name` is the output the messages name. A TimeoutError after `wait_s`."""
  deadline, last_report = time.time() + wait_s, 0.0
  while True:
    done = read_done()
    missing = [s.name for s in shards if s.name not in done]
    if not missing:
      return done
    if time.time() > deadline:
      raise TimeoutError(f"{name}: shards {', '.join(missing[:5])} (of {len(missing)} missing) "
                         f"were not written within {wait_s:.0f} s; run the workers that own "
                         "them again, then worker 0")
    if time.time() - last_report > 60:
      log(f"{name}: waiting for {len(missing)} shards from the other workers")
      last_report = time.time()
    time.sleep(2)


def commit(builder, staging, shards: List[Shard], done: Dict[str, dict]):
  """Write the tfds metadata for the finished shards and move the dataset into place."""
  final = epath.Path(builder.data_path)
  split_infos = []
  for split in dict.fromkeys(s.split for s in shards):
    mine = [done[s.name] for s in shards if s.split == split]
    split_infos.append(tfds.core.SplitInfo(
        name=split, shard_lengths=[d["num_examples"] for d in mine],
        num_bytes=sum(d["num_bytes"] for d in mine),
        filename_template=_filename(builder, final, split)))
  builder.info.set_splits(tfds.core.SplitDict(split_infos))
  staging = epath.Path(staging)
  storage.remove_tree(os.fspath(staging / _DONE_DIR))
  storage.remove_tree(os.fspath(staging / _PLAN_FILE))
  builder.info.write_to_directory(staging)  # dataset_info.json last: what tfds looks for
  if not storage.is_url(os.fspath(final)):
    try:
      os.rename(staging, final)
    except OSError:
      if not reload(builder).is_prepared():  # not a concurrent commit of the same dataset
        raise
      storage.remove_tree(os.fspath(staging))
  else:
    metadata = ("features.json", "dataset_info.json")
    files = sorted(staging.iterdir(), key=lambda p: (p.name in metadata,
                                                     metadata.index(p.name)
                                                     if p.name in metadata else 0))
    for f in files:
      f.copy(final / f.name, overwrite=True)
    staging.rmtree()
  return reload(builder)


# -- one builder per data dir --------------------------------------------------------------------

@contextlib.contextmanager
def _lock(path: str) -> Iterator[None]:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepare(builder, manual_dir: Optional[str] = None, *, builds: bool = True,
            wait_s: float = 3600, log: Callable[[str], None] = logging.info, **build_kwargs):
  """The prepared builder, built once however many processes call this at the same time.

  Local data dir: whoever takes the lock first builds; the others wait on the lock and find the
  dataset done. Object storage: the caller with `builds=True` builds (the others pass False and
  wait for its commit).
  """
  if builder.is_prepared():
    return builder
  data_path = os.fspath(builder.data_path)
  if not storage.is_url(data_path):
    with _lock(os.path.join(os.path.dirname(data_path), f".{os.path.basename(data_path)}.lock")):
      current = reload(builder)
      if current.is_prepared():
        log(f"{builder.name}: built by another process in {data_path}")
        return current
      return build(current, manual_dir, log=log, **build_kwargs)
  if builds:
    return build(builder, manual_dir, log=log, **build_kwargs)
  log(f"{builder.name}: waiting for another process to build it in {data_path}")
  deadline = time.time() + wait_s
  while time.time() < deadline:
    current = reload(builder)
    if current.is_prepared():
      return current
    time.sleep(5)
  raise TimeoutError(f"{data_path}: no dataset appeared within {wait_s:.0f} s")
