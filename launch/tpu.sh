#!/usr/bin/env bash
# Cloud TPU VMs (one host or a pod slice): create, set up, build data, train, watch, stop, delete.
#
#   launch/tpu.sh create     --name=semflow --zone=us-central2-b --accelerator=v4-32 [--spot]
#   launch/tpu.sh setup      --name=semflow --zone=us-central2-b
#   launch/tpu.sh build-data --name=semflow --zone=us-central2-b -- \
#       cityscapes_semantic --manual_dir=/data/cityscapes --data_dir=gs://my-bucket/tfds
#   launch/tpu.sh train      --name=semflow --zone=us-central2-b -- \
#       --config=configs/cityscapes.py --workdir=gs://my-bucket/runs/cityscapes \
#       --config.data.tfds_data_dir=gs://my-bucket/tfds --config.model.init_from=gs://my-bucket/sd15
#   launch/tpu.sh logs       --name=semflow --zone=us-central2-b [--worker=0]
#   launch/tpu.sh stop       --name=semflow --zone=us-central2-b
#   launch/tpu.sh delete     --name=semflow --zone=us-central2-b
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
# --spot (a spot queued resource; `train` re-creates it if it was preempted), --worker (logs),
# --dry_run (print every gcloud command instead of running it). Everything after `--` reaches
# `python -m semflow_jax.main` (train) or `python -m semflow_jax.data.build` (build-data) on the
# workers unchanged: each argument is quoted for the remote shell, so spaces and quotes survive.
#
# setup ships the files git tracks (as they are in the working tree, nothing else: no .venv/ or
# runs/) to every worker, and installs requirements.lock plus jax[tpu] at the locked version into
# ~/semflow_jax_venv, skipping the install when the lock has not changed since the last setup.
# train starts the run detached on every worker (setsid nohup: it outlives the SSH session); its
# log is ~/semflow_jax.log on each worker, TensorBoard and checkpoints are in the --workdir
# (a gs:// bucket every worker sees). stop sends SIGTERM: the run saves a checkpoint at the current
# step and exits 0; train again with the same arguments continues from it.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit "${1:-2}"
}

[ $# -ge 1 ] || usage
COMMAND=$1
shift
case "$COMMAND" in
  create | setup | build-data | train | logs | stop | delete) ;;
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
WORKER=0
PASSTHROUGH=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name=*) NAME=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --accelerator=*) ACCELERATOR=${1#*=} ;;
    --version=*) VERSION=${1#*=} ;;
    --project=*) PROJECT=${1#*=} ;;
    --worker=*) WORKER=${1#*=} ;;
    --name | --zone | --accelerator | --version | --project | --worker)
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

REPO=$(cd "$(dirname "$0")/.." && pwd)
JAX_VERSION=$(grep -E '^jax==' "$REPO/requirements.lock" | cut -d= -f3)
REMOTE_DIR='$HOME/semflow_jax'       # the shipped files (replaced by every setup)
REMOTE_VENV='$HOME/semflow_jax_venv' # the environment (kept while requirements.lock is unchanged)
REMOTE_LOG='$HOME/semflow_jax.log'
REMOTE_PID='$HOME/semflow_jax.pid'
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

ssh_workers() {  # ssh_workers WORKER COMMAND
  run gcloud compute tpus tpu-vm ssh "$NAME" "${COMMON[@]}" --worker="$1" --command="$2"
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
  if $SPOT; then
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
  run gcloud compute tpus tpu-vm scp "$archive" "$NAME:semflow_jax.tar.gz" "${COMMON[@]}" --worker=all
  $DRY_RUN || rm -f "$archive"
  # torch is left out: training on a TPU needs none (any torch wheel from PyPI is the CUDA build).
  ssh_workers all "set -e
rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf ~/semflow_jax.tar.gz -C $REMOTE_DIR
cd $REMOTE_DIR
if cmp -s requirements.lock $REMOTE_VENV/requirements.lock; then
  echo 'requirements.lock unchanged: keeping the environment'
else
  # The lock is tested on Python 3.11 (the TPU images' Ubuntu 22.04 ships 3.10).
  command -v python3.11 >/dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv; }
  rm -rf $REMOTE_VENV && python3.11 -m venv $REMOTE_VENV
  grep -v '^torch==' requirements.lock > /tmp/semflow_jax_requirements.txt
  $REMOTE_VENV/bin/pip install -q -r /tmp/semflow_jax_requirements.txt 'jax[tpu]==$JAX_VERSION'
  cp requirements.lock $REMOTE_VENV/requirements.lock
fi
$REMOTE_VENV/bin/pip install -q --no-deps -e ."
}

tpu_state() {
  gcloud compute tpus tpu-vm describe "$NAME" "${COMMON[@]}" --format='value(state)' 2>/dev/null || true
}

train() {
  if $SPOT && ! $DRY_RUN; then
    local state
    state=$(tpu_state)
    if [ "$state" != READY ]; then
      # A preempted spot VM does not come back: delete it, queue a new one, set it up again.
      echo "launch/tpu.sh: $NAME is ${state:-gone}; re-creating it" >&2
      [ -n "$ACCELERATOR" ] || { echo "launch/tpu.sh: re-creating needs --accelerator" >&2; exit 2; }
      delete
      create
      setup
    fi
  elif $SPOT; then
    run gcloud compute tpus tpu-vm describe "$NAME" "${COMMON[@]}" --format='value(state)'
  fi
  # Detached on every worker at once: setsid + nohup, so the run survives the SSH session;
  # --distributed=yes makes each host find its peers through the TPU metadata server.
  ssh_workers all "if [ -f $REMOTE_PID ] && kill -0 \$(cat $REMOTE_PID) 2>/dev/null; then
  echo 'a run is still going here (launch/tpu.sh stop first)' >&2; exit 1
fi
cd $REMOTE_DIR || exit 1
setsid nohup $REMOTE_VENV/bin/python -m semflow_jax.main --distributed=yes$(quoted_passthrough) \
> $REMOTE_LOG 2>&1 < /dev/null &
echo \$! > $REMOTE_PID"
}

build_data() {
  [ ${#PASSTHROUGH[@]} -gt 0 ] || { echo "launch/tpu.sh: build-data needs '-- <dataset> --manual_dir=... --data_dir=gs://...'" >&2; exit 2; }
  # Once, on worker 0: every worker then reads the tfds data dir in the bucket.
  ssh_workers 0 "cd $REMOTE_DIR && $REMOTE_VENV/bin/python -m semflow_jax.data.build$(quoted_passthrough)"
}

delete() {
  if $SPOT; then
    run gcloud compute tpus queued-resources delete "$NAME" "${COMMON[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${COMMON[@]}" --quiet
  fi
}

case "$COMMAND" in
  create) create ;;
  setup) setup ;;
  build-data) build_data ;;
  train) train ;;
  logs) ssh_workers "$WORKER" "tail -n 200 -F $REMOTE_LOG" ;;
  stop) ssh_workers all "[ -f $REMOTE_PID ] && kill -TERM \$(cat $REMOTE_PID) || echo 'no run started here'" ;;
  delete) delete ;;
esac
