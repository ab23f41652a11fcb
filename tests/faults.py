"""semflow_jax.main with a fault injected: the tests' stand-in for a host that fails or is told
to stop.

  python -m tests.faults FAULT[,FAULT...] MAIN_ARGS...

FAULT is one of
  raise:K         an exception while the batch of step K is read (a bug, or bad data on one host)
  kill:K          SIGKILL to this process at that point (out of memory, a lost host)
  sigterm:K       SIGTERM to this process at that point (maintenance, a scheduler's stop)
  sigterm_eval:K  SIGTERM to this process as the evaluation of step K starts, which then waits
                  a few seconds, so that every process hears of it before the first batch
Each fault writes the time it fired to $SEMFLOW_FAULT_LOG (if set), for the tests' timings.
"""

import os
import signal
import sys
import time


def _fired(what: str) -> None:
  log = os.environ.get("SEMFLOW_FAULT_LOG")
  if log:
    with open(log, "a") as f:
      f.write(f"{what} {time.time()}\n")


def _install(faults) -> None:
  from semflow_jax import evaluate
  from semflow_jax.data import pipeline

  at_step = {int(k): kind for kind, k in faults if kind != "sigterm_eval"}
  eval_steps = {int(k) for kind, k in faults if kind == "sigterm_eval"}
  next_batch = pipeline.TrainIterator.__next__

  def faulty_next(self):
    kind = at_step.get(self.position + 1)  # the batch of step position + 1
    if kind:
      _fired(kind)
      if kind == "raise":
        raise RuntimeError(f"injected failure while reading the batch of step {self.position + 1}")
      os.kill(os.getpid(), signal.SIGKILL if kind == "kill" else signal.SIGTERM)
    return next_batch(self)

  pipeline.TrainIterator.__next__ = faulty_next
  evaluate_call = evaluate.Evaluator.__call__

  def faulty_evaluate(self, params, step, *args, **kwargs):
    if step in eval_steps:
      _fired("sigterm_eval")
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(5)  # JAX's preemption service tells the other processes meanwhile
    return evaluate_call(self, params, step, *args, **kwargs)

  evaluate.Evaluator.__call__ = faulty_evaluate


def main() -> None:
  faults = [f.split(":") for f in sys.argv[1].split(",") if f]
  sys.argv = [sys.argv[0], *sys.argv[2:]]
  from absl import app
  from semflow_jax import main as entry
  _install(faults)
  app.run(entry.run_and_exit, flags_parser=entry.cli.parse_flags)


if __name__ == "__main__":
  main()
