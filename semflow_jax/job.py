"""Ending and stopping a job of several processes together (after `jax.distributed.initialize()`).

`semflow_jax.main` calls `start_job` right after `jax.distributed.initialize()` and `finish_job` /
`fail_job` on the way out; the training loop asks `stop_point_reached` after every step and notes
its step with `note_step`. Nothing here runs at import, and everything is a no-op for a single
process.

Ending together: after `jax.distributed.initialize()` the processes of a job wait for each
other in every collective and barrier, so one that fails would leave the others waiting (a
barrier's 30 minutes, or JAX's heartbeat check, about 100 s, which aborts with a native stack
dump). `start_job` starts a watcher thread in every process that publishes a heartbeat in the
coordination service's key-value store and reads everyone else's. A process that fails
publishes its error first (`fail_job`); one killed outright (kill -9, out of memory, a lost
host) stops beating. Either way every other process prints one line naming it and exits within
`peer_timeout_s` (SEMFLOW_PEER_TIMEOUT_S, default 30 s), whatever its main thread is blocked in.
So does a process still running that long after a peer finished (`finish_job`): nothing it
waits for in a collective can come any more.

Stopping together: with several processes `start_job` also installs the SIGTERM handler, and
the watchers agree on the call of `stop_point_reached()` at which every process stops (see
there and train.Preemption).
"""

import os
import signal
import sys
import threading
import time
import traceback
from typing import Optional

from absl import logging

# Keys in the coordination service's key-value store (process 0 hosts it).
_PREFIX = "semflow_jax/job/"
_FAILED = _PREFIX + "failed"        # "<process>\t<exit code>\t<one line>": the first one wins
_BEAT = _PREFIX + "beat/"           # + process index: a counter each watcher advances
_LEFT = _PREFIX + "left/"           # + process index: this process is exiting
_DONE = _PREFIX + "done/"           # + process index: at finish_job (value: its last step)
_NOTICE = _PREFIX + "stop/notice"   # a process was told to stop (SIGTERM): value, its index
_COUNT = _PREFIX + "stop/count/"    # + process index: its stop-point calls when it heard of it

PEER_TIMEOUT_S = 30.0   # silence after which a peer counts as gone
_BEAT_INTERVAL_S = 1.0
_COUNT_INTERVAL_S = 0.05  # how often the stop protocol looks for the other processes' counts
# The longest the coordinator (process 0) waits for the others to leave: this, or three peer
# timeouts where that is longer.
_LEAVE_WAIT_S = 10.0
_LEFT_GRACE_S = 1.0     # then the moment it gives the last one from its word to its exit


_exiting = threading.Lock()  # held by whichever thread ends the process: one line, one exit


def _claim_exit() -> bool:
  """True for the first thread that decides to end this process; the others must stay quiet."""
  return _exiting.acquire(blocking=False)


class _Watcher:
  """Heartbeats out, peers' heartbeats and failures in; ends this process when a peer is gone."""

  def __init__(self, client, index: int, count: int, timeout_s: float):
    self.client, self.index, self.count, self.timeout_s = client, index, count, timeout_s
    self.stopped = threading.Event()
    self.last_contact = time.monotonic()
    # Stopping together (see stop_point_reached): the main thread counts its calls under
    # `_calls_lock`; this thread holds the lock from reporting the count until the stop point
    # is agreed, so no process moves past a count it reported.
    self.stop_requested = False   # SIGTERM to this process (the handler sets it)
    self.calls = 0
    self.stop_at = None           # the call at which every process answers True
    self._calls_lock = threading.Lock()
    self._counting = False
    self.step: Optional[int] = None  # the main thread's last step (note_step), for the lines
    self.finishing = False        # the main thread is in finish_job
    self._thread = threading.Thread(target=self._run, daemon=True,
                                    name="semflow_jax job watcher")
    self._contact = threading.Thread(target=self._watch_contact, daemon=True,
                                     name="semflow_jax coordinator watcher")

  def start(self):
    self._thread.start()
    self._contact.start()

  def stop(self):
    self.stopped.set()
    self._thread.join(timeout=10)
    self._contact.join(timeout=10)

  def _run(self):
    """One write (this process's beat) and one directory read (everyone's) per interval."""
    beat = 0
    start = time.monotonic()
    beats = {p: (None, start) for p in range(self.count) if p != self.index}
    finished_peer = None  # (peer, since): a peer finished or left while this process works on
    while not self.stopped.wait(0 if beat == 0 else
                                _COUNT_INTERVAL_S if self._counting else _BEAT_INTERVAL_S):
      try:
        self.client.key_value_set(f"{_BEAT}{self.index}", str(beat), allow_overwrite=True)
        entries = dict(self.client.key_value_dir_get(_PREFIX))
      except Exception:  # the coordinator is unreachable: _watch_contact decides
        continue
      beat += 1
      now = self.last_contact = time.monotonic()
      failure = _parse_failure(entries.get(_FAILED))
      if failure and failure[0] != self.index:
        # A moment's grace: if this process is failing the same way, its own line wins.
        if not self.stopped.wait(2.0):
          self._end(failure[1], f"process {failure[0]} failed: {failure[2]}")
        return
      self._agree_on_stop(entries)
      left = {int(k[len(_LEFT):]) for k in entries if k.startswith(_LEFT)}
      done = {int(k[len(_DONE):]): v for k, v in entries.items() if k.startswith(_DONE)}
      _follow_beats(beats, entries, now)
      for peer, (value, since) in beats.items():
        if peer not in left and now - since > self.timeout_s:
          what = ("never joined" if value is None else
                  f"stopped responding {now - since:.0f} s ago (killed, out of memory, or its "
                  "host is gone)")
          # Recorded as that process's failure, so that every process names the same one.
          _publish(self.client, peer, 1, what)
          self._end(1, f"process {peer} {what}")
          return
      # A peer that finished (or left) cannot take part in a collective any more: if this
      # process does not finish too within the timeout, it is waiting for it in one (the
      # processes disagreed on where to stop, or one skipped a collective): end it, naming
      # the peer, instead of waiting for ever.
      gone = sorted((set(done) | left) - {self.index})
      if self.finishing or not gone:
        finished_peer = None
      elif finished_peer is None or finished_peer[0] not in gone:
        finished_peer = (gone[0], now)
      elif now - finished_peer[1] > self.timeout_s:
        peer = finished_peer[0]
        at = f" at step {done[peer]}" if done.get(peer, "") not in ("", "None") else ""
        where = f" at step {self.step}" if self.step is not None else ""
        reason = (f"process {peer} finished{at} {now - finished_peer[1]:.0f} s ago while process "
                  f"{self.index} is still running{where} (waiting for it in a collective that "
                  "cannot complete)")
        _publish(self.client, self.index, 1, reason)  # the finished peer names this process
        self._end(1, reason)
        return

  def _agree_on_stop(self, entries: dict) -> None:
    """The stop protocol: publish a SIGTERM of this process as the job's notice; on a notice,
    report this process's call count (holding the main thread at it) and, once every process
    has reported, stop at the largest count + 1: a call no process has made yet."""
    if self.stop_at is not None:
      return
    try:
      if self.stop_requested and _NOTICE not in entries:
        self.client.key_value_set(_NOTICE, str(self.index), allow_overwrite=True)
        entries[_NOTICE] = str(self.index)
      if _NOTICE not in entries:
        return
      if not self._counting:
        self._calls_lock.acquire()
        self._counting = True
        try:
          self.client.key_value_set(f"{_COUNT}{self.index}", str(self.calls),
                                    allow_overwrite=True)
        except Exception:
          self._counting = False
          self._calls_lock.release()
          raise
        entries[f"{_COUNT}{self.index}"] = str(self.calls)
      counts = [entries.get(f"{_COUNT}{p}") for p in range(self.count)]
      if None in counts:
        return
      self.stop_at = max(int(c) for c in counts) + 1
      logging.warning("stop requested (SIGTERM to process %s): every process stops at its "
                      "stop-point call %d (this one is at %d)", entries[_NOTICE], self.stop_at,
                      self.calls)
      self._counting = False
      self._calls_lock.release()
    except Exception:  # the coordinator is unreachable: _watch_contact decides
      return

  def _watch_contact(self):
    while not self.stopped.wait(_BEAT_INTERVAL_S):
      silent = time.monotonic() - self.last_contact
      if silent > self.timeout_s:
        # Process 0 hosts the coordination service: without it no collective can finish.
        self._end(1, f"process 0 (the coordinator) has been unreachable for {silent:.0f} s "
                  "(it stopped, or its host is gone)", leave=False)
        return

  def _end(self, code: int, reason: str, leave: bool = True):
    if self.stopped.is_set() or not _claim_exit():
      return
    print(f"error: {reason}; stopping process {self.index} too", file=sys.stderr, flush=True)
    _leave(code, leave)


_job: Optional[_Watcher] = None


def peer_timeout_s() -> float:
  """Seconds of silence after which a peer counts as gone (SEMFLOW_PEER_TIMEOUT_S)."""
  return float(os.environ.get("SEMFLOW_PEER_TIMEOUT_S", PEER_TIMEOUT_S))


def _client():
  from jax._src import distributed  # JAX keeps the coordination client there (Orbax reads it too)
  return distributed.global_state.client


def start_job() -> None:
  """Watch the other processes of this job; call right after jax.distributed.initialize().
  Nothing for a single process."""
  global _job
  import jax
  if _job is not None or _client() is None or jax.process_count() == 1:
    return
  _job = _Watcher(_client(), jax.process_index(), jax.process_count(), peer_timeout_s())
  if threading.current_thread() is threading.main_thread():
    # SIGTERM (maintenance, a scheduler's stop) is a request to stop, agreed with the others
    # (stop_point_reached). This handler replaces the one of JAX's preemption service
    # (installed by jax.distributed.initialize), which then never hears of a SIGTERM: its sync
    # point, which Orbax's CheckpointManager also asks with step numbers from its save and
    # finalize threads, moving the service's one call counter, is never set (issue #28). The
    # service itself stays on (JAX's default; Orbax's questions to it just answer False).
    signal.signal(signal.SIGTERM, _on_sigterm)
  _job.start()


def _on_sigterm(signum, frame) -> None:
  if _job is not None:
    _job.stop_requested = True


def in_job() -> bool:
  """Is this process one of several, watched by start_job?"""
  return _job is not None


def stop_point_reached() -> bool:
  """Every process of the job calls this at the same points, in the same order (after every
  train step, between evaluation batches); after a SIGTERM to any of them, all answer True at
  the same call, one that none of them had made when they agreed on it. The watcher threads
  agree (_Watcher._agree_on_stop) through the coordination service, so a process blocked in a
  collective or running ahead of the others still reports where it is. False for one process
  (see train.Preemption)."""
  job = _job
  if job is None:
    return False
  with job._calls_lock:  # pylint: disable=protected-access
    job.calls += 1
    return job.calls == job.stop_at


def stop_requested() -> bool:
  """Has any process of the job been told to stop (the agreed call may still be ahead)?"""
  return _job is not None and (_job.stop_requested or _job.stop_at is not None)


def note_step(step: int) -> None:
  """Where the main thread is, for the line that ends a process left behind by its peers."""
  if _job is not None:
    _job.step = step


def _parse_failure(value: Optional[str]):
  if not value:
    return None
  process, code, message = value.split("\t", 2)
  return int(process), int(code), message


def _publish(client, process: int, code: int, message: str) -> None:
  """Record that `process` failed (exit code, one line), unless a failure was recorded first."""
  line = " ".join(str(message).split())
  line = line[len("error: "):] if line.startswith("error: ") else line
  try:
    client.key_value_set(_FAILED, f"{process}\t{code}\t{line[:500]}")
  except Exception:  # already set (the first failure wins), or the coordinator is gone
    pass


def _follow_beats(beats: dict, entries: dict, now: float) -> None:
  """{process: (its last beat, when that last changed)}, brought up to date from `entries`."""
  for p, (value, _) in beats.items():
    current = entries.get(f"{_BEAT}{p}")
    if current != value:
      beats[p] = (current, now)


def _leave(code: int, tell_others: bool = True) -> None:
  """Exit now. Process 0 hosts the coordination service, so it first gives the others a moment
  to read what happened before the service goes away."""
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:
      pass
  logging.flush()
  client = _client()
  if tell_others and client is not None and _job is not None:
    try:
      client.key_value_set(f"{_LEFT}{_job.index}", str(code), allow_overwrite=True)
      if _job.index == 0:
        # Wait for every process that is still alive (its beat moves) to say it is leaving: a
        # peer that is still in its last steps when the service goes away aborts with a native
        # stack dump instead of its own exit code (a loaded host can be many seconds behind).
        now = time.monotonic()
        beats = {p: (None, now) for p in range(_job.count)}
        deadline = now + max(_LEAVE_WAIT_S, 3 * _job.timeout_s)  # against hangs only
        while time.monotonic() < deadline:
          entries = dict(client.key_value_dir_get(_PREFIX))
          now = time.monotonic()
          done = {int(k[len(_LEFT):]) for k in entries if k.startswith(_LEFT)}
          failure = _parse_failure(entries.get(_FAILED))
          if failure:
            done.add(failure[0])  # a process that failed may be gone without a word (kill -9)
          _follow_beats(beats, entries, now)
          done |= {p for p, (_, since) in beats.items() if now - since > _job.timeout_s}  # gone
          if done >= set(range(_job.count)):
            time.sleep(_LEFT_GRACE_S)  # the last to leave is between its word and its exit
            break
          time.sleep(0.2)
    except Exception:
      pass
  # Not sys.exit: the main thread may be inside a collective that can never finish now, and
  # JAX's atexit shutdown would wait for processes that are gone.
  os._exit(code)


def fail_job(code: int, line: str, unexpected: Optional[BaseException] = None) -> None:
  """End this process with exit status `code` after printing `line` ('error: ...'); in a job of
  several processes, tell the others first (each prints one line naming this process).

  `unexpected`: an exception that is not a known user error. Its traceback is printed; if it
  came from the runtime (a collective that failed), a peer that failed or died is the likely
  cause, so the line names that peer when one is found within the peer timeout.
  """
  import jax
  if _job is None:
    if unexpected is not None:
      traceback.print_exception(unexpected)
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)
  if isinstance(unexpected, jax.errors.JaxRuntimeError):
    # The watcher ends the process itself if it finds a peer gone meanwhile.
    culprit = peer_failure(wait_s=_job.timeout_s + 2 * _BEAT_INTERVAL_S)
    if culprit is not None and _claim_exit():
      print(f"error: process {culprit[0]} failed: {culprit[2]}; stopping process "
            f"{_job.index} too", file=sys.stderr, flush=True)
      _leave(culprit[1])
  if not _claim_exit():  # the watcher is ending the process already
    threading.Event().wait()
  if unexpected is not None:
    traceback.print_exception(unexpected)
  print(line, file=sys.stderr, flush=True)
  _publish(_job.client, _job.index, code, line)
  _leave(code)


def peer_failure(wait_s: float = 0.0) -> Optional[tuple]:
  """(process, exit code, line) of a failure another process recorded, waiting up to `wait_s`
  for one; None if there is none."""
  if _job is None:
    return None
  deadline = time.monotonic() + wait_s
  while True:
    try:
      failure = _parse_failure(dict(_job.client.key_value_dir_get(_PREFIX)).get(_FAILED))
    except Exception:
      failure = None
    if failure and failure[0] != _job.index:
      return failure
    if time.monotonic() >= deadline:
      return None
    time.sleep(0.5)


def finish_job(barrier_timeout_s: int = 24 * 3600) -> None:
  """The work is done: wait for every process to get here, stop watching, and shut the
  distributed runtime down together. Nothing for a single process."""
  global _job
  import jax
  if _job is None:
    return
  _job.finishing = True
  try:  # the others' watchers: this process takes part in no collective any more
    _job.client.key_value_set(f"{_DONE}{_job.index}", str(_job.step), allow_overwrite=True)
  except Exception:
    pass
  # A barrier of the coordination service, not a device collective: a process still writing
  # its last files keeps beating meanwhile, and one that fails is reported by the watcher.
  _job.client.wait_at_barrier("semflow_jax/job/finished", barrier_timeout_s * 1000)
  _job.stop()
  _job = None
  jax.distributed.shutdown()
