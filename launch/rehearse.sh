#!/usr/bin/env bash
# The pod run's dress rehearsal on this machine (launch/rehearse.py says what it runs):
#
#   launch/rehearse.sh [--dir=/tmp/semflow_rehearsal] [--short]
#
# A GCS server on localhost as the bucket; the tiny SD model converted into it; a folder dataset
# built and its latents encoded there by two processes each; training by four processes from the
# cached latents, SIGTERM to one, resumed on two; losses checked against an uninterrupted run;
# the final evaluation and a folder segmentation. Prints each stage's wall time and the bucket.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" launch/rehearse.py "$@"
