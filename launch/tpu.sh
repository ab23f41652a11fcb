#!/usr/bin/env bash
# Cloud TPU VMs (one host, a pod slice, or several slices): create, set up, build data, train,
# watch, stop, delete.
#
#   launch/tpu.sh create     --name=semflow --zone=us-central2-b --accelerator=v4-32 [--spot]
#   launch/tpu.sh setup      --name=semflow --zone=us-central2-b
#   launch/tpu.sh build-data --name=semflow --zone=us-central2-b -- \
#       cityscapes_semantic --manual_dir=/data/cityscapes --data_dir=gs://my-bucket/tfds --processes=8
#   launch/tpu.sh train      --name=semflow --zone=us-central2-b -- \
#       --config=configs/cityscapes.py --workdir=gs://my-bucket/runs/cityscapes \
#       --config.data.tfds_data_dir=gs://my-bucket/tfds --config.model.init_from=gs://my-bucket/sd15
#   launch/tpu.sh watch      --name=semflow --zone=us-central2-b --spot --accelerator=v4-32 -- \
#       --config=configs/cityscapes.py --workdir=gs://my-bucket/runs/cityscapes ...
#   launch/tpu.sh logs       --name=semflow --zone=us-central2-b [--worker=0]
#   launch/tpu.sh stop       --name=semflow --zone=us-central2-b
#   launch/tpu.sh delete     --name=semflow --zone=us-central2-b
#
# Two slices joined over the data-centre network (Multislice; what `python -m semflow_jax.plan
# --topology=v5e-16x2` compiles for): --slices=2 on every command.
#   launch/tpu.sh create     --name=semflow --zone=us-west4-a --accelerator=v5litepod-16 --slices=2
#   launch/tpu.sh setup      --name=semflow --zone=us-west4-a --slices=2
#   launch/tpu.sh train      --name=semflow --zone=us-west4-a --slices=2 -- \
#       --config=configs/cityscapes.py --workdir=gs://my-bucket/runs/cityscapes ...
#   launch/tpu.sh logs       --name=semflow --zone=us-west4-a --slices=2 [--slice=1] [--worker=0]
#   launch/tpu.sh delete     --name=semflow --zone=us-west4-a --slices=2
#
# The studio (python -m semflow_jax.studio, README) on a one-host TPU VM after setup, through an
# SSH tunnel: while this runs, http://127.0.0.1:7860 here is the page on the VM's loopback.
#   gcloud compute tpus tpu-vm ssh semflow --zone=us-central2-b --worker=0 \
#       --ssh-flag='-L 7860:127.0.0.1:7860' --command='cd ~/semflow_jax && \
#       ~/semflow_jax_venv/bin/python -m semflow_jax.studio --config=configs/cityscapes.py \
#       --workdir=gs://my-bucket/runs/cityscapes'
#
# Options: --name, --zone (or $TPU_NAME, $ZONE), --accelerator (create; e.g. v5litepod-16, v4-32),
# --version (the TPU software version; default for the accelerator's generation), --project,
# --spot (a spot queued resource; `train` re-creates it if it was preempted), --worker (logs: which
# worker's; build-data: build on that worker alone instead of on all of them),
# --logs (where workers copy their logs; default <workdir>/logs for a gs:// --workdir),
# --interval (watch: seconds between checks, default 300), --slices (how many slices, default 1),
# --slice (logs, build-data --worker: which slice; logs of every slice's worker without it),
# --dry_run (print every gcloud command instead of running it). Everything after `--` reaches
# `python -m semflow_jax.main` (train, watch) or `python -m semflow_jax.data.build` (build-data)
# on the workers unchanged: each argument is quoted for the remote shell, so spaces and quotes
# survive.
#
# setup ships the files git tracks (as they are in the working tree, nothing else: no .venv/ or
# runs/) to every worker, and installs requirements.lock plus jax[tpu] at the locked version into
# ~/semflow_jax_venv, skipping the install when the lock has not changed since the last setup.
# train starts the run detached on every worker (setsid nohup: it outlives the SSH session); its
# log is ~/semflow_jax.log on each worker, copied every minute and at the end to
# <logs>/worker-<N>/<start time>.log (one object per worker and start, so the history outlives
# re-created VMs). TensorBoard and checkpoints are in the --workdir (a gs:// bucket every worker
# sees). stop sends SIGTERM: the run saves a checkpoint at the current step and exits 0; train
# again with the same arguments continues from it. watch keeps a run going until it completes
# (its final eval/metrics_<num_steps>.json is in the workdir): it re-creates a preempted spot VM,
# sets it up and resumes, restarts a run that stopped after SIGTERM, and stops, naming the
# worker's exit status, when the run failed.
#
# --slices=N (N > 1) is a multislice queued resource: `gcloud compute tpus queued-resources create
# NAME --node-count=N --node-prefix=NAME`, whose slices are the TPU VMs NAME-0 .. NAME-(N-1) (spot
# with --spot, on demand without). Every command acts on each of them (at once, each line of its
# output prefixed with the VM's name; one after the other with --dry_run), delete removes the
# queued resource with its VMs, a preempted slice re-creates all of them, and build-data shares the
# shards among the workers of every slice (numbered slice by slice). Logs go to
# <logs>/slice-<S>/worker-<N>/. The TPU runtime gives each VM the variables that join the slices
# (MEGASCALE_COORDINATOR_ADDRESS, MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID, in the VM's tpu-env
# metadata); libtpu and jax.distributed read them there, so this script sets none (a value set
# here would override the runtime's). The run's mesh puts data parallelism across the slices by
# itself: config.mesh.dcn_data=-1 (the default) is every slice the devices' slice_index names.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit "${1:-2}"
}

[ $# -ge 1 ] || usage
COMMAND=$1
shift
case "$COMMAND" in
  create | setup | build-data | train | watch | logs | stop | delete) ;;
  -h | --help | help) usage 0 ;;
  *) echo "launch/tpu.sh: unknown command '$COMMAND'" >&2; usage ;;
esac

NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
ACCELERATOR=""
VERSION=""
PROJECT=${PROJECT:-}
SPOT=false
DRY_RUN=false
WORKER=""
LOGS=""
INTERVAL=300
SLICES=1
SLICE=""
PASSTHROUGH=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name=*) NAME=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --accelerator=*) ACCELERATOR=${1#*=} ;;
    --version=*) VERSION=${1#*=} ;;
    --project=*) PROJECT=${1#*=} ;;
    --worker=*) WORKER=${1#*=} ;;
    --logs=*) LOGS=${1#*=} ;;
    --interval=*) INTERVAL=${1#*=} ;;
    --slices=*) SLICES=${1#*=} ;;
    --slice=*) SLICE=${1#*=} ;;
    --name | --zone | --accelerator | --version | --project | --worker | --logs | --interval | \
      --slices | --slice)
      [ $# -ge 2 ] || { echo "launch/tpu.sh: $1 needs a value" >&2; exit 2; }
      set -- "$1=$2" "${@:3}"
      continue ;;
    --spot) SPOT=true ;;
    --dry_run | --dry-run) DRY_RUN=true ;;
    --) shift; PASSTHROUGH=("$@"); break ;;
    *) echo "launch/tpu.sh: unknown option '$1' (arguments for the run go after --)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$NAME" ] || { echo "launch/tpu.sh: --name (or TPU_NAME) is required" >&2; exit 2; }
[ -n "$ZONE" ] || { echo "launch/tpu.sh: --zone (or ZONE) is required" >&2; exit 2; }
case "$SLICES" in
  '' | *[!0-9]* | 0*) echo "launch/tpu.sh: --slices must be a positive number, not '$SLICES'" >&2; exit 2 ;;
esac
case "$SLICE" in
  '') ;;
  *[!0-9]* | 0?*) echo "launch/tpu.sh: --slice must be a slice's index, not '$SLICE'" >&2; exit 2 ;;
  *) [ "$SLICE" -lt "$SLICES" ] || { echo "launch/tpu.sh: --slice=$SLICE, but there are $SLICES slices (0 .. $((SLICES - 1)))" >&2; exit 2; } ;;
esac

REPO=$(cd "$(dirname "$0")/.." && pwd)
JAX_VERSION=$(grep -E '^jax==' "$REPO/requirements.lock" | cut -d= -f3)
REMOTE_DIR='$HOME/semflow_jax'       # the shipped files (replaced by every setup)
REMOTE_VENV='$HOME/semflow_jax_venv' # the environment (kept while requirements.lock is unchanged)
REMOTE_LOG='$HOME/semflow_jax.log'
REMOTE_PID='$HOME/semflow_jax.pid'    # the run's python process
REMOTE_EXIT='$HOME/semflow_jax.exit'  # its exit status, once it has ended
REMOTE_RUNNER='$HOME/semflow_jax_run.sh'
COMMON=(--zone="$ZONE")
[ -n "$PROJECT" ] && COMMON+=(--project="$PROJECT")

# Print (--dry_run) or run one command; the printed form is shell-quoted, one command a line.
run() {
  if $DRY_RUN; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

# The arguments after `--`, each quoted for the remote bash.
quoted_passthrough() {
  if [ ${#PASSTHROUGH[@]} -gt 0 ]; then
    printf ' %q' "${PASSTHROUGH[@]}"
  fi
}

# The TPU VM of slice $1: NAME itself for one slice, NAME-<index> (gcloud's --node-prefix naming)
# for several.
node() {
  if [ "$SLICES" -eq 1 ]; then echo "$NAME"; else echo "$NAME-$1"; fi
}

ssh_node() {  # ssh_node NODE WORKER COMMAND
  run gcloud compute tpus tpu-vm ssh "$1" "${COMMON[@]}" --worker="$2" --command="$3"
}

ssh_workers() {  # ssh_workers WORKER COMMAND: on (the first slice's) VM
  ssh_node "$(node 0)" "$@"
}

# every_slice FUNCTION ARGS...: FUNCTION NODE SLICE ARGS... for each slice. Several slices at once
# (each output line prefixed with the VM's name; fails if any failed); one slice, or --dry_run,
# in order.
every_slice() {
  local fn=$1 i pid failed=0
  shift
  if [ "$SLICES" -eq 1 ] || $DRY_RUN; then
    for ((i = 0; i < SLICES; i++)); do "$fn" "$(node "$i")" "$i" "$@"; done
    return
  fi
  local pids=()
  for ((i = 0; i < SLICES; i++)); do
    ("$fn" "$(node "$i")" "$i" "$@" 2>&1 | sed "s/^/[$(node "$i")] /") &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  return "$failed"
}

default_version() {
  case "$ACCELERATOR" in
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

create() {
  [ -n "$ACCELERATOR" ] || { echo "launch/tpu.sh: create needs --accelerator (e.g. v4-32)" >&2; exit 2; }
  local version=${VERSION:-$(default_version)}
  if [ "$SLICES" -gt 1 ]; then
    # Multislice: one queued resource, N slices named NAME-0 .. NAME-(N-1); ACTIVE once all exist.
    local spot=()
    $SPOT && spot=(--spot)
    run gcloud compute tpus queued-resources create "$NAME" "${COMMON[@]}" --node-count="$SLICES" \
      --node-prefix="$NAME" --accelerator-type="$ACCELERATOR" --runtime-version="$version" "${spot[@]}"
    wait_active
  elif $SPOT; then
    # Spot capacity comes through a queued resource; it is ACTIVE once the VM exists.
    run gcloud compute tpus queued-resources create "$NAME" "${COMMON[@]}" --node-id="$NAME" \
      --accelerator-type="$ACCELERATOR" --runtime-version="$version" --spot
    wait_active
  else
    run gcloud compute tpus tpu-vm create "$NAME" "${COMMON[@]}" \
      --accelerator-type="$ACCELERATOR" --version="$version"
  fi
}

wait_active() {
  if $DRY_RUN; then
    run gcloud compute tpus queued-resources describe "$NAME" "${COMMON[@]}" --format='value(state.state)'
    return
  fi
  local state=""
  for _ in $(seq 1 360); do  # up to an hour
    state=$(gcloud compute tpus queued-resources describe "$NAME" "${COMMON[@]}" \
      --format='value(state.state)' 2>/dev/null || true)
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED) echo "launch/tpu.sh: queued resource $NAME is $state" >&2; exit 1 ;;
    esac
    echo "launch/tpu.sh: waiting for $NAME (${state:-not found})" >&2
    sleep 10
  done
  echo "launch/tpu.sh: $NAME not ACTIVE after an hour (last state: ${state:-not found})" >&2
  exit 1
}

setup() {
  local archive
  archive=$(mktemp "${TMPDIR:-/tmp}/semflow_jax.XXXXXX.tar.gz")
  # Tracked files only, with their working-tree content (no .venv/, runs/ or other local files).
  if $DRY_RUN; then
    echo "git -C $(printf '%q' "$REPO") ls-files -z | tar -czf $(printf '%q' "$archive") --null -T -"
  else
    git -C "$REPO" ls-files -z | (cd "$REPO" && tar -czf "$archive" --null -T -)
  fi
  every_slice setup_node "$archive"
  $DRY_RUN || rm -f "$archive"
}

setup_node() {  # setup_node NODE SLICE ARCHIVE
  run gcloud compute tpus tpu-vm scp "$3" "$1:semflow_jax.tar.gz" "${COMMON[@]}" --worker=all
  # requirements.lock is the runtime lock: no PyTorch, no test tools (requirements-test.lock).
  ssh_node "$1" all "set -e
rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf ~/semflow_jax.tar.gz -C $REMOTE_DIR
cd $REMOTE_DIR
if cmp -s requirements.lock $REMOTE_VENV/requirements.lock; then
  echo 'requirements.lock unchanged: keeping the environment'
else
  # The lock is tested on Python 3.11 (the TPU images' Ubuntu 22.04 ships 3.10).
  command -v python3.11 >/dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv; }
  rm -rf $REMOTE_VENV && python3.11 -m venv $REMOTE_VENV
  $REMOTE_VENV/bin/pip install -q -r requirements.lock 'jax[tpu]==$JAX_VERSION'
  cp requirements.lock $REMOTE_VENV/requirements.lock
fi
$REMOTE_VENV/bin/pip install -q --no-deps -e ."
}

tpu_state() {  # the VM's state; with several slices READY if all are, else the first other's
  if [ "$SLICES" -eq 1 ]; then
    gcloud compute tpus tpu-vm describe "$NAME" "${COMMON[@]}" --format='value(state)' 2>/dev/null || true
    return
  fi
  local i state
  for ((i = 0; i < SLICES; i++)); do
    state=$(gcloud compute tpus tpu-vm describe "$(node "$i")" "${COMMON[@]}" --format='value(state)' \
      2>/dev/null || true)
    [ "$state" = READY ] || { echo "${state:-gone} ($(node "$i"))"; return; }
  done
  echo READY
}

describe_nodes() {  # --dry_run: what tpu_state asks
  local i
  for ((i = 0; i < SLICES; i++)); do
    run gcloud compute tpus tpu-vm describe "$(node "$i")" "${COMMON[@]}" --format='value(state)'
  done
}

# Where worker 0 of slice 0 copies its log (for messages).
worker0_logs() {
  if [ "$SLICES" -eq 1 ]; then echo "$(logs_url)/worker-0/"; else echo "$(logs_url)/slice-0/worker-0/"; fi
}

# The --workdir=... among the arguments after `--` (empty if none).
run_workdir() {
  local arg workdir=""
  for arg in "${PASSTHROUGH[@]}"; do
    case "$arg" in --workdir=*) workdir=${arg#*=} ;; esac
  done
  echo "${workdir%/}"
}

logs_url() {
  if [ -n "$LOGS" ]; then
    echo "${LOGS%/}"
    return
  fi
  local workdir
  workdir=$(run_workdir)
  case "$workdir" in gs://*) echo "$workdir/logs" ;; *) echo "" ;; esac
}

recreate() {
  # A preempted spot VM does not come back: delete it, queue a new one, set it up again.
  [ -n "$ACCELERATOR" ] || { echo "launch/tpu.sh: re-creating needs --accelerator" >&2; exit 2; }
  delete
  create
  setup
}

# What runs on each worker of slice $1: the job, detached, its log copied to the bucket while it
# runs (to <logs>/worker-<N>/, or <logs>/slice-<S>/worker-<N>/ with several slices).
worker_runner() {
  local logs per_slice=""
  logs=$(logs_url)
  [ "$SLICES" -gt 1 ] && per_slice="slice-$1/"
  cat <<RUNNER
#!/usr/bin/env bash
# Written by launch/tpu.sh train.
log=\$HOME/semflow_jax.log
logs=$(printf %q "$logs")
worker=\${TPU_WORKER_ID:-\$(curl -sf -m 5 -H 'Metadata-Flavor: Google' \\
  http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \\
  || hostname)}
dest="\$logs/${per_slice}worker-\$worker/\$(date -u +%Y%m%dT%H%M%SZ).log"
cd \$HOME/semflow_jax || exit 1
\$HOME/semflow_jax_venv/bin/python -m semflow_jax.main --distributed=yes$(quoted_passthrough) \\
  > "\$log" 2>&1 < /dev/null &
pid=\$!
echo "\$pid" > \$HOME/semflow_jax.pid
copy_log() { [ -z "\$logs" ] || gcloud storage cp --quiet "\$log" "\$dest" > /dev/null 2>&1 || true; }
last=\$SECONDS
while kill -0 "\$pid" 2> /dev/null; do
  sleep 5
  if [ \$((SECONDS - last)) -ge 60 ]; then copy_log; last=\$SECONDS; fi
done
wait "\$pid"
status=\$?
echo "launch/tpu.sh: the run exited with status \$status" >> "\$log"
copy_log
echo "\$status" > \$HOME/semflow_jax.exit
RUNNER
}

start_run() {
  every_slice start_node
}

start_node() {  # start_node NODE SLICE
  # Detached on every worker at once: setsid + nohup, so the run survives the SSH session;
  # --distributed=yes makes each host find its peers through the TPU metadata server (and, with
  # several slices, the other slices through the MEGASCALE_* values the runtime put there).
  ssh_node "$1" all "if [ -f $REMOTE_PID ] && kill -0 \$(cat $REMOTE_PID) 2>/dev/null; then
  echo 'a run is still going here (launch/tpu.sh stop first)' >&2; exit 1
fi
cat > $REMOTE_RUNNER <<'SEMFLOW_RUNNER'
$(worker_runner "$2")
SEMFLOW_RUNNER
rm -f $REMOTE_EXIT $REMOTE_PID
setsid nohup bash $REMOTE_RUNNER > /dev/null 2>&1 < /dev/null &
for _ in \$(seq 1 100); do [ -s $REMOTE_PID ] && break; sleep 0.1; done"
}

train() {
  if $SPOT && ! $DRY_RUN; then
    local state
    state=$(tpu_state)
    if [ "$state" != READY ]; then
      echo "launch/tpu.sh: $NAME is ${state:-gone}; re-creating it" >&2
      recreate
    fi
  elif $SPOT; then
    describe_nodes
  fi
  start_run
}

# The run is complete when its last evaluation is in the workdir: eval/metrics_<num_steps>.json,
# num_steps read from the config.json the run wrote there.
run_complete() {
  local workdir steps
  workdir=$(run_workdir)
  if $DRY_RUN; then
    run gcloud storage cat "$workdir/config.json"
    run gcloud storage ls "$workdir/eval/metrics_<train.num_steps>.json"
    return 1
  fi
  steps=$(gcloud storage cat "$workdir/config.json" 2>/dev/null | python3 -c \
    'import json, sys; print(json.load(sys.stdin)["train"]["num_steps"])' 2>/dev/null) || return 1
  gcloud storage ls "$workdir/eval/metrics_$steps.json" > /dev/null 2>&1
}

# Worker 0's run: "running", "exited <status>" or "none".
run_state() {
  ssh_workers 0 "if [ -f $REMOTE_PID ] && kill -0 \$(cat $REMOTE_PID) 2>/dev/null; then echo running
elif [ -f $REMOTE_EXIT ]; then echo exited \$(cat $REMOTE_EXIT)
else echo none; fi" 2>/dev/null | tail -n 1
}

watch() {
  case "$(run_workdir)" in
    gs://*) ;;
    *) echo "launch/tpu.sh: watch needs --workdir=gs://... among the run's arguments (it reads the run's progress there)" >&2; exit 2 ;;
  esac
  if $DRY_RUN; then  # one pass through every branch
    describe_nodes
    recreate
    start_run
    run_complete || true
    ssh_workers 0 "(worker 0's run: running, exited <status> or none)"
    return
  fi
  local state status
  while true; do
    state=$(tpu_state)
    if [ "$state" != READY ]; then
      echo "launch/tpu.sh: $NAME is ${state:-gone}; re-creating it and resuming" >&2
      recreate
      start_run
    elif run_complete; then
      echo "launch/tpu.sh: the run is complete ($(run_workdir)/eval)" >&2
      return 0
    else
      status=$(run_state || true)
      case "$status" in
        running) ;;
        "exited 0" | none)  # stopped by SIGTERM (maintenance, stop), or never started here
          echo "launch/tpu.sh: no run going on $NAME (${status}); resuming" >&2
          start_run ;;
        exited*)
          echo "launch/tpu.sh: the run failed (worker 0: ${status}); its log: $(worker0_logs) or launch/tpu.sh logs" >&2
          return 1 ;;
        *) echo "launch/tpu.sh: could not reach worker 0 (${status:-no answer}); trying again" >&2 ;;
      esac
    fi
    sleep "$INTERVAL"
  done
}

build_data() {
  [ ${#PASSTHROUGH[@]} -gt 0 ] || { echo "launch/tpu.sh: build-data needs '-- <dataset> --manual_dir=... --data_dir=gs://...'" >&2; exit 2; }
  if [ -n "$WORKER" ]; then  # one worker builds everything
    ssh_node "$(node "${SLICE:-0}")" "$WORKER" "cd $REMOTE_DIR && $REMOTE_VENV/bin/python -m semflow_jax.data.build$(quoted_passthrough)"
    return
  fi
  # Every worker writes its share of the shards into the bucket (each needs the unpacked download
  # at --manual_dir); worker 0 makes the dataset visible once all are written. A worker's index
  # and the number of workers come from the TPU metadata server, as jax.distributed finds them;
  # with several slices they are numbered slice by slice, as jax.distributed numbers processes.
  every_slice build_on_node
}

build_on_node() {  # build_on_node NODE SLICE
  local index='$INDEX' count='$COUNT'
  if [ "$SLICES" -gt 1 ]; then
    index="\$(($2 * COUNT + INDEX))"
    count="\$(($SLICES * COUNT))"
  fi
  ssh_node "$1" all "cd $REMOTE_DIR || exit 1
META=http://metadata.google.internal/computeMetadata/v1/instance/attributes
INDEX=\$(curl -sf -H Metadata-Flavor:Google \$META/agent-worker-number) || exit 1
COUNT=\$(curl -sf -H Metadata-Flavor:Google \$META/worker-network-endpoints | tr , '\\n' | wc -l) || exit 1
$REMOTE_VENV/bin/python -m semflow_jax.data.build$(quoted_passthrough) --num_workers=$count --worker_index=$index"
}

delete() {
  if $SPOT || [ "$SLICES" -gt 1 ]; then  # a multislice is always a queued resource
    run gcloud compute tpus queued-resources delete "$NAME" "${COMMON[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${COMMON[@]}" --quiet
  fi
}

logs_node() {  # logs_node NODE SLICE
  ssh_node "$1" "${WORKER:-0}" "tail -n 200 -F $REMOTE_LOG"
}

stop_node() {  # stop_node NODE SLICE
  ssh_node "$1" all "[ -f $REMOTE_PID ] && kill -TERM \$(cat $REMOTE_PID) || echo 'no run started here'"
}

case "$COMMAND" in
  create) create ;;
  setup) setup ;;
  build-data) build_data ;;
  train) train ;;
  watch) watch ;;
  logs)
    if [ -n "$SLICE" ]; then
      ssh_node "$(node "$SLICE")" "${WORKER:-0}" "tail -n 200 -F $REMOTE_LOG"
    else
      every_slice logs_node
    fi ;;
  stop) every_slice stop_node ;;
  delete) delete ;;
esac
