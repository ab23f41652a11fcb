"""Ending a job together (semflow_jax/job.py), with an in-memory coordination service: the
stop protocol's agreement and the end of a process whose peer finished without it. The real
thing, two processes on localhost, is tests/test_resilience.py and tests/hang_loop.py."""

import threading
import time

import pytest

from semflow_jax import job


class FakeClient:
  """The coordination service's key-value store, shared by the watchers of one test."""

  def __init__(self):
    self.kv, self.lock = {}, threading.Lock()

  def key_value_set(self, key, value, allow_overwrite=False):
    with self.lock:
      if key in self.kv and not allow_overwrite:
        raise RuntimeError(f"{key} exists")
      self.kv[key] = value

  def key_value_dir_get(self, prefix):
    with self.lock:
      return [(k, v) for k, v in self.kv.items() if k.startswith(prefix)]


@pytest.fixture()
def ended(monkeypatch):
  """Watchers end their process through job._leave: recorded instead of os._exit."""
  exits = []
  monkeypatch.setattr(job, "_leave", lambda code, tell_others=True: exits.append(code))
  monkeypatch.setattr(job, "_exiting", threading.Lock())
  return exits


def _watchers(n, timeout_s=30.0):
  client = FakeClient()
  watchers = [job._Watcher(client, i, n, timeout_s) for i in range(n)]
  for w in watchers:
    w.start()
  return client, watchers


def _reached(watcher):
  with watcher._calls_lock:
    watcher.calls += 1
    return watcher.calls == watcher.stop_at


def test_every_process_stops_at_the_same_call_however_far_apart_they_are(ended):
  """Process 1 runs 7 calls ahead of process 0 (asynchronous dispatch, no collective in
  between) when process 0 is told to stop: both answer True at one call, after both counts."""
  _, (w0, w1) = _watchers(2)
  try:
    for _ in range(3):
      assert not _reached(w0)
    for _ in range(10):
      assert not _reached(w1)
    w0.stop_requested = True
    deadline = time.time() + 20
    while (w0.stop_at is None or w1.stop_at is None) and time.time() < deadline:
      time.sleep(0.05)
    assert w0.stop_at == w1.stop_at == 11  # the next call of the process furthest ahead
    answers = [[_reached(w) for _ in range(12)] for w in (w0, w1)]
    assert answers[0].index(True) + 4 == 11 and answers[0].count(True) == 1
    assert answers[1].index(True) + 11 == 11 and answers[1].count(True) == 1
  finally:
    w0.stop()
    w1.stop()
  assert ended == []


def test_a_process_left_behind_by_a_finished_peer_ends_naming_it(ended, capsys):
  """Process 1 finished (at finish_job) while process 0 still waits in a collective: process 0
  ends within the timeout, one line naming process 1 and both steps."""
  client, (w0, w1) = _watchers(2, timeout_s=2.0)
  try:
    w0.step, w1.step = 7, 5
    w1.finishing = True
    client.key_value_set(job._DONE + "1", "5")
    deadline = time.time() + 20
    while not ended and time.time() < deadline:
      time.sleep(0.1)
  finally:
    w0.stop()
    w1.stop()
  assert ended == [1]
  lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, lines
  assert "process 1 finished at step 5" in lines[0] and "process 0 is still running at step 7" \
      in lines[0] and "stopping process 0 too" in lines[0]
