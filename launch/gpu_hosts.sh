#!/usr/bin/env bash
# Multi-node GPU training without a scheduler: run this on every host with its own index.
#
#   # on host 0 (10.0.0.1), host 1, ..., host N-1:
#   COORDINATOR=10.0.0.1:1234 NUM_PROCESSES=4 PROCESS_ID=0 launch/gpu_hosts.sh \
#       --config=configs/synthetic.py --workdir=/shared/runs/semflow
#
# Process 0 listens on COORDINATOR; the others connect to it. All hosts must run the same
# command and see the same workdir. The same flags run several processes on one machine, which
# is how the test suite exercises this path on CPUs (tests/test_resilience.py).
set -euo pipefail
: "${COORDINATOR:?set COORDINATOR to HOST:PORT of process 0}"
: "${NUM_PROCESSES:?set NUM_PROCESSES}"
: "${PROCESS_ID:?set PROCESS_ID to the index of this host, 0..NUM_PROCESSES-1}"
cd "$(dirname "$0")/.."
exec python -m semflow_jax.main --coordinator_address="$COORDINATOR" \
  --num_processes="$NUM_PROCESSES" --process_id="$PROCESS_ID" "$@"
