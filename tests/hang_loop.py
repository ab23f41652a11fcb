"""Issue #28's proof that two processes stop together: N two-process training jobs on localhost,
process 1 sent SIGTERM as the evaluation of step K starts (tests/faults.py `sigterm_eval:K`),
each reported as one line: both exit codes, the step each saved, the seconds from the signal to
each exit, and whether the job stopped together (both exit 0 having saved the same step, no
earlier than the signal) or ended with one `error:` line.

  python -m tests.hang_loop [--runs 20] [--burn 1] [--timeout 180] [--steps 3,5] [--parallel 1]

Run it under load: the machine's other work, plus `--burn` busy-looping processes of its own.
Exits non-zero unless every run stopped together or ended with the one line; a run still going
--timeout seconds after the signal is a hang (killed, reported).
"""

import argparse
import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(workdir, tfds_dir, fault_step, num_steps, timeout, log_dir, cache):
  address = f"127.0.0.1:{_free_port()}"
  fault_log = os.path.join(log_dir, "faults.log")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "SEMFLOW_FAULT_LOG": fault_log, "JAX_PLATFORMS": "cpu",
         "JAX_COMPILATION_CACHE_DIR": cache, "TF_CPP_MIN_LOG_LEVEL": "2",
         "PYTHONFAULTHANDLER": "1"}
  procs, logs = [], []
  for i, fault in enumerate(["", f"sigterm_eval:{fault_step}"]):
    cmd = [sys.executable, "-m", "tests.faults", fault, "--config=configs/synthetic.py:tiny",
           f"--workdir={workdir}", f"--config.data.tfds_data_dir={tfds_dir}",
           f"--config.train.num_steps={num_steps}", "--config.train.log_every=1",
           "--config.train.checkpoint_every=5", f"--config.train.eval_every={fault_step}",
           "--config.train.tensorboard=False", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
           "--config.mesh.fsdp_min_size=64", "--config.eval.metrics=('miou',)",
           "--config.eval.seg_steps=(1,)", "--config.eval.colour_only=False",
           f"--coordinator_address={address}",
           "--num_processes=2", f"--process_id={i}"]
    logs.append(open(os.path.join(log_dir, f"process_{i}.log"), "w+"))
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logs[-1],
                                  stderr=subprocess.STDOUT))
  ended = [None, None]
  start = time.time()
  while None in ended:
    fired = _fired(fault_log)
    # A ceiling against hangs counted from the signal (start-up and compiling vary with load).
    if time.time() > (fired + timeout if fired else start + 900):
      break
    for i, p in enumerate(procs):
      if ended[i] is None and p.poll() is not None:
        ended[i] = time.time()  # pyright: ignore[reportCallIssue]
    time.sleep(0.1)
  if None in ended:  # hung: every thread's Python stack into the log (PYTHONFAULTHANDLER)
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGABRT)
    time.sleep(3)
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()
  outputs = []
  for log in logs:
    log.seek(0)
    outputs.append(log.read())
    log.close()
  return procs, outputs, ended, _fired(fault_log)


def _fired(fault_log):
  """When the SIGTERM was sent (tests/faults.py writes it), or None."""
  if os.path.exists(fault_log):
    for line in open(fault_log):
      kind, when = line.split()
      if kind == "sigterm_eval":
        return float(when)
  return None


def _saved(output):
  for line in output.splitlines():
    if "preemption (SIGTERM): saved step" in line:
      return int(line.split("saved step ")[1].split()[0])
  return None


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--runs", type=int, default=20)
  parser.add_argument("--burn", type=int, default=1, help="busy-looping processes meanwhile")
  parser.add_argument("--timeout", type=float, default=180.0,
                      help="seconds after the signal after which a job counts as hung")
  parser.add_argument("--steps", default="3,5",
                      help="K of sigterm_eval:K, in turn (evaluations every K steps, "
                           "checkpoints every 5)")
  parser.add_argument("--parallel", type=int, default=1, help="jobs at the same time")
  parser.add_argument("--keep", action="store_true", help="keep the workdirs and logs")
  parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "semflow_hang_loop"),
                      help="the dataset and compilation cache, kept between invocations")
  args = parser.parse_args()
  steps = [int(s) for s in args.steps.split(",")]
  base = tempfile.mkdtemp(prefix="hang_loop_")
  tfds_dir, cache = os.path.join(args.data, "tfds"), os.path.join(args.data, "cache")
  burners = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(args.burn)]
  good = 0
  lock = threading.Lock()

  def one(run):
    nonlocal good
    k = steps[run % len(steps)]
    run_dir = os.path.join(base, f"run_{run}")
    os.makedirs(run_dir)
    start = time.time()
    procs, outputs, ended, fired = _run(os.path.join(run_dir, "workdir"), tfds_dir, k, k + 2,
                                        args.timeout, run_dir, cache)
    codes = [p.returncode for p in procs]
    saved = [_saved(o) for o in outputs]
    errors = [[l for l in o.splitlines() if l.startswith("error:")] for o in outputs]
    after = [f"{e - fired:.1f}" if e and fired else "-" for e in ended]
    together = codes == [0, 0] and saved[0] is not None and saved[0] == saved[1] >= k
    one_line = (any(c != 0 for c in codes) and None not in ended and
                all(len(e) == 1 for e, c in zip(errors, codes) if c != 0))
    hang = None in ended
    verdict = ("stopped together" if together else "ended with one line" if one_line else
               "HANG" if hang else "FAILED")
    with lock:
      good += together or one_line
      print(f"run {run + 1:2d} sigterm_eval:{k:<3d} exit codes {codes}  saved {saved}  "
            f"s from signal to exit {after}  ({time.time() - start:.0f} s)  {verdict}"
            + (f"  {errors}" if any(errors) else ""), flush=True)
      if not (together or one_line):
        for i, o in enumerate(outputs):
          print(f"--- process {i} (last lines) ---\n" + "\n".join(o.splitlines()[-40:]))
    if not args.keep and (together or one_line):
      shutil.rmtree(run_dir, ignore_errors=True)

  try:
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
      list(pool.map(one, range(args.runs)))
  finally:
    for b in burners:
      b.kill()
      b.wait()
  print(f"{good} of {args.runs} stopped together or ended with one line (logs: {base})")
  sys.exit(0 if good == args.runs else 1)


if __name__ == "__main__":
  main()
