"""storage.py on local paths (bucket paths: tests/test_gcs.py, against a GCS server)."""

import math
import os

import pytest

from semflow_jax import storage


def test_a_bucket_url_is_never_made_a_local_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert storage.resolve("gs://b/run/") == "gs://b/run"
  assert storage.join("gs://b/run", "eval", "m.json") == "gs://b/run/eval/m.json"
  assert storage.parent("gs://b/run/x.png") == "gs://b/run"
  assert storage.resolve("runs/x") == str(tmp_path / "runs" / "x")
  storage.check("runs/x", "--workdir", write=True)  # local paths: left to their users
  assert not os.path.exists(tmp_path / "gs:") and not os.path.exists(tmp_path / "runs")


def test_writes_are_atomic_and_leave_no_temporaries(tmp_path):
  target = tmp_path / "deep" / "dir" / "m.json"
  storage.write_json(target, {"a": 1, "b": None})
  assert storage.read_json(target) == {"a": 1, "b": None}
  # A write that fails half-way keeps the old content and leaves nothing beside it.
  with pytest.raises(ValueError, match="Out of range float"):
    storage.write_json(target, {"a": math.nan})  # strict JSON: NaN is refused
  with pytest.raises(TypeError):
    storage.write_bytes(target, "not bytes")
  assert storage.read_json(target) == {"a": 1, "b": None}
  assert os.listdir(target.parent) == ["m.json"]


def test_a_failure_between_the_temporary_write_and_the_rename_keeps_the_old_file(
    tmp_path, monkeypatch):
  """The temporary is complete when the rename fails (a full disk, a kill): the target keeps its
  old content, no reader sees the new bytes half-written, and the temporary is cleaned up."""
  target = tmp_path / "m.json"
  storage.write_json(target, {"old": True})
  path_class = type(storage.as_path(target))  # epath's concrete class for local paths
  written = []
  real_write = path_class.write_bytes

  def write_then_record(self, data):
    written.append((str(self), real_write(self, data)))

  def failing_replace(self, destination):
    assert os.path.exists(self) and str(self) != str(destination)  # the new bytes are on disk
    raise OSError("injected: rename failed")

  monkeypatch.setattr(path_class, "write_bytes", write_then_record)
  monkeypatch.setattr(path_class, "replace", failing_replace)
  with pytest.raises(OSError, match="injected"):
    storage.write_json(target, {"new": True})
  (temporary, _), = written
  assert os.path.basename(temporary).startswith(".m.json.tmp-")  # written beside, not in place
  monkeypatch.undo()
  assert storage.read_json(target) == {"old": True}
  assert os.listdir(tmp_path) == ["m.json"]


def test_staged_directory_moves_into_place(tmp_path):
  final = tmp_path / "out"
  staging = storage.staging_dir(final)
  assert os.path.dirname(staging) == str(tmp_path) and os.path.basename(staging).startswith(".out")
  storage.write_text(os.path.join(staging, "sub", "t.txt"), "hi")
  storage.move_tree(staging, final)
  assert storage.read_text(final / "sub" / "t.txt") == "hi" and not os.path.exists(staging)
  assert storage.listdir(tmp_path) == ["out"]
  with storage.local_copy(final) as local:
    assert local == str(final)  # a local path is used in place
  storage.remove_tree(final)
  storage.remove_tree(final)  # nothing there: no error
  assert storage.listdir(tmp_path) == []
