#!/usr/bin/env bash
# The planner tables of benchmarks/RESULTS.md ("Fitting the chips"): every full recipe on a
# v5e-16 and a v4-32 slice with its shipped layout (all programs) and with the layout before
# issue #10 (data parallel, einsum attention, no micro-batches; train step only), and
# --mode=segment on one image on one v5e chip. One compile at a time, niced; each writes
# runs/plans/<name>.{log,json}. An SD-1.5 train step compiles in minutes on an idle 2-core
# machine (504 s for celebamask_hq on v5e 2x2); all of this takes hours there.
#
#   bash benchmarks/plan_recipes.sh            # needs libtpu: pip install -r requirements-tpu.lock
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/plans
BEFORE="--config.mesh.data=-1 --config.mesh.fsdp=1 --config.model.attention=einsum --config.train.grad_accum_steps=1"
plan() {
  local name=$1; shift
  echo "python -m semflow_jax.plan $* --json=runs/plans/$name.json"
  nice -n 5 python -m semflow_jax.plan "$@" --json="runs/plans/$name.json" > "runs/plans/$name.log" 2>&1 \
    || echo "  failed: see runs/plans/$name.log"
  grep -E '^\|' "runs/plans/$name.log" || true
}
plan sd15_segment_v5e-1 --config=configs/celebamask_hq.py --topology=v5e-1 --programs=segment --infer_batch=1
for recipe in celebamask_hq cityscapes coco_stuff; do
  for topology in v5e-16 v4-32; do
    plan "${recipe}_${topology}" --config="configs/$recipe.py" --topology="$topology"
    # shellcheck disable=SC2086
    plan "${recipe}_${topology}_before" --config="configs/$recipe.py" --topology="$topology" \
      --programs=train_step $BEFORE
  done
done
