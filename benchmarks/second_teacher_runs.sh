#!/bin/bash
# The distillation rows of docs/second-teacher.md, one after another (one compute process, one thread each):
#   benchmarks/second_teacher_runs.sh CODE_COPY "NAME:SETTING=VALUE SETTING=VALUE" ...
# e.g. benchmarks/second_teacher_runs.sh "$PWD" "default:student_output=native" "velocity:student_output=velocity"
# A setting written L.KEY=VALUE is a loss option (-L KEY=VALUE), e.g. "long:L.long_jump_span=0.5".
# TEACHER (default /work/ddpm-runs/teacher, the folder benchmarks/ddpm_teacher.py wrote; the same weights are in
# benchmarks/results/ddpm-teacher) and RUNS (default /work/ddpm-runs) may be set.  Each row: `ttfm-distill run`
# into $RUNS/NAME, then `ttfm-distill eval` with 1024 noises of seed 0 into $RUNS/NAME/eval-1024.json.
set -u
CODE=$1; shift
cd "$CODE"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH="$CODE" HF_HUB_OFFLINE=1
T=${TEACHER:-/work/ddpm-runs/teacher}
RUNS=${RUNS:-/work/ddpm-runs}
for row in "$@"; do
  name=${row%%:*}; sets=${row#*:}
  out=$RUNS/$name
  args=()
  for s in $sets; do
    case $s in L.*) args+=(-L "${s#L.}") ;; *) args+=(--set "$s") ;; esac
  done
  echo "== $name: ttfm-distill run --teacher $T --output $out ${args[*]} ($(date -u +%T))"
  /usr/bin/time -f "%e s wall" python -m ttfm_distill run --teacher "$T" --output "$out" "${args[@]}" > "$RUNS/$name.run.log" 2>&1
  echo "run rc=$? ($(date -u +%T))"
  /usr/bin/time -f "%e s wall" python -m ttfm_distill eval --model "$out" --steps 1,2,4,8 --teacher-steps 1,2,4,8,16,50 \
      --num 1024 --seed 0 --quiet --output "$out/eval-1024.json" > "$RUNS/$name.eval.log" 2>&1
  echo "eval rc=$? ($(date -u +%T))"
done
echo "== done ($(date -u +%T))"
