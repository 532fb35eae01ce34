#!/usr/bin/env bash
# The ITVM option sweep behind the defaults (docs/benchmarks.md, "Which reading of ITVM is the default").
# usage: benchmarks/sweep_image.sh TEACHER OUTROOT STEPS
#   the table in docs/benchmarks.md: benchmarks/sweep_image.sh /path/to/fashion16-step2000 /tmp/sweep 400
#   (an earlier checkpoint of the embedded teacher's recipe:
#    python examples/train_default_teacher.py --steps 10000 --stop-after 2000)
# Every row spells out all the options it depends on, so it does not drift with the defaults.
set -u
T=${1:-builtin:fashion16}; ROOT=${2:-/tmp/sweep}; STEPS=${3:-400}
common="--teacher $T --max-steps $STEPS -q --overwrite --batch-size 32 --set pool_size=512 --set eval_samples=64 --set reference_steps=16 --set checkpoint_every=100000"
# the base of the sweep (the defaults before it): EMA 0.99 target, tau 0.05, Euler teacher segment, 25% diagonal
base="-L reading=composed -L intermediate=terminal -L tau_mode=absolute -L tau=0.05 -L teacher_solver=euler -L target_model=ema --ema-decay 0.99 --set diagonal_fraction=0.25 --set time_sampling=mixed"
run() { name=$1; shift; /usr/bin/time -f "$name %e s" ttfm-distill run $common --output "$ROOT/$name" "$@" 2>&1 | grep -E "error| s$" ; }
run tau05_euler_ema99 $base
run tau_rel25_heun_ema99 $base -L tau_mode=relative -L tau=0.25 -L teacher_solver=heun
run uniform_ema99 $base -L intermediate=uniform
run tau10_heun_ema0 $base -L tau=0.1 -L teacher_solver=heun --ema-decay 0
run tau10_heun_ema99 $base -L tau=0.1 -L teacher_solver=heun
run tau10_euler_ema0 $base -L tau=0.1 --ema-decay 0
run tau05_euler_ema0 $base --ema-decay 0
run uniform_ema0 $base -L intermediate=uniform --ema-decay 0
run initial_tau10_heun_ema0 $base -L intermediate=initial -L tau=0.1 -L teacher_solver=heun --ema-decay 0
run tau10_heun_ema0_diag0 $base -L tau=0.1 -L teacher_solver=heun --ema-decay 0 --set diagonal_fraction=0
run tau10_heun_ema0_diag0_uniformtimes $base -L tau=0.1 -L teacher_solver=heun --ema-decay 0 --set diagonal_fraction=0 --set time_sampling=uniform
run lfmd_fd --loss lfmd -L derivative=fd --ema-decay 0.99 --set diagonal_fraction=0.25
run progressive --loss progressive --ema-decay 0.99 --set diagonal_fraction=0.25
for d in "$ROOT"/*/; do python -c "import json; m=json.load(open('$d/metrics.json')); e=m['flow_map_error']; print('$(basename "$d")', 'student', {k: round(v, 4) for k, v in e['student'].items()}, 'euler', {k: round(v, 4) for k, v in e['teacher_euler'].items()}, m['training']['seconds'], 's')"; done
