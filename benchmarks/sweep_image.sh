#!/usr/bin/env bash
# Quick sweep of objectives/options on an image teacher at a fixed step budget.
# usage: benchmarks/sweep_image.sh TEACHER OUTROOT STEPS
set -u
T=${1:-builtin:fashion16}; ROOT=${2:-/tmp/sweep}; STEPS=${3:-400}
common="--teacher $T --max-steps $STEPS -q --overwrite --set pool_size=512 --set eval_samples=64 --set reference_steps=16 --set checkpoint_every=100000 --batch-size 32"
run() { name=$1; shift; /usr/bin/time -f "$name %e s" ttfm-distill run $common --output $ROOT/$name "$@" 2>&1 | grep -E "error|flow-map| s$" ; }
run itvm_term_abs05_euler
run itvm_term_rel25_heun -L tau_mode=relative -L tau=0.25 -L teacher_solver=heun
run itvm_uniform -L intermediate=uniform
run itvm_term_abs10_heun_ema0 -L tau=0.1 -L teacher_solver=heun --ema-decay 0
run lfmd_fd --loss lfmd
run progressive --loss progressive
for d in $ROOT/*/; do python -c "import json,sys; m=json.load(open('$d/metrics.json'))['flow_map_error']; print('$(basename $d)', 'student', {k: round(v,4) for k,v in m['student'].items()}, 'euler', {k: round(v,4) for k,v in m['teacher_euler'].items()})"; done
