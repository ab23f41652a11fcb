#!/usr/bin/env bash
# Run semflow_jax on every host of a Cloud TPU VM (single host or pod slice).
#
#   TPU=my-tpu ZONE=us-central2-b launch/tpu_vm.sh \
#       --config=configs/synthetic.py --workdir=gs://my-bucket/semflow/synthetic
#
# Copies this checkout to every worker, installs the locked environment (plus libtpu from
# requirements-tpu.lock, the version jax[tpu] pins) and starts the same command on all hosts at once. --distributed=yes makes every
# host call jax.distributed.initialize(), which finds its peers through the TPU metadata server.
# Maintenance events reach the run as SIGTERM: it checkpoints the current step on all hosts and
# exits; run this script again to continue. Extra arguments go to `python -m semflow_jax.main`.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to its zone}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REMOTE_DIR=${REMOTE_DIR:-semflow_jax}

gcloud compute tpus tpu-vm scp --recurse --worker=all --zone="$ZONE" $PROJECT_FLAG \
  "$(cd "$(dirname "$0")/.." && pwd)" "$TPU:$REMOTE_DIR"
gcloud compute tpus tpu-vm ssh "$TPU" --worker=all --zone="$ZONE" $PROJECT_FLAG --command="
  set -e; cd $REMOTE_DIR
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -r requirements.lock -r requirements-tpu.lock && pip install -q --no-deps -e .
  python -m semflow_jax.main --distributed=yes $*"
