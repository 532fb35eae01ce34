#!/usr/bin/env bash
# Train the teacher zoo's two own teachers, one after the other, each on one thread in about BUDGET seconds:
# the v-prediction DDPM (benchmarks/ddpm_teacher.py --prediction-type v_prediction, project layout) and the
# class-conditional DiT flow teacher (benchmarks/dit_teacher.py). Each step count (the length of the lr
# schedule) is fitted to BUDGET from a 20-step timing taken just before; --max-seconds (BUDGET + 15%) is the hard
# cap. Re-running resumes an unfinished teacher (the same --steps is read back from its first fit) and skips a
# finished one. WAIT_PID: wait for that process (another training on the same cores) to exit first.
#
#   ZOO=/work/zoo BUDGET=840 WAIT_PID=2830 nohup bash benchmarks/zoo_teachers.sh > /work/zoo/teachers.log 2>&1 &
#
# `bash benchmarks/zoo_teachers.sh ship [NAME[=FOLDER] ...]` copies each finished teacher (default: vpred, dit and
# ddpm-script from $ZOO/NAME) to benchmarks/results/zoo-teachers/NAME/ (the pipeline folder without its resume
# state) and its training record $ZOO/NAME-teacher.json, where there is one, beside it, ready to commit.
set -u
cd "$(dirname "$0")/.."
ZOO=${ZOO:-/work/zoo}
if [ "${1:-}" = ship ]; then
  shift
  for item in "${@:-vpred dit ddpm-script}"; do
    for it in $item; do
      name=${it%%=*} src=$ZOO/${it%%=*}; [ "$it" != "$name" ] && src=${it#*=}
      dst=benchmarks/results/zoo-teachers/$name
      if [ ! -f "$src/model_index.json" ]; then echo "$name: no finished pipeline in $src"; continue; fi
      rm -rf "$dst" && mkdir -p "$dst"
      cp -r "$src/model_index.json" "$src/scheduler" "$dst/"
      for sub in unet transformer; do [ -d "$src/$sub" ] && cp -r "$src/$sub" "$dst/"; done
      [ -f "$ZOO/$name-teacher.json" ] && cp "$ZOO/$name-teacher.json" "benchmarks/results/zoo-teachers/$name-teacher.json"
      echo "$name: $(du -sh "$dst" | cut -f1) from $src -> $dst"
    done
  done
  exit 0
fi
BUDGET=${BUDGET:-840}
PY=${PY:-python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$ZOO"
if [ -n "${WAIT_PID:-}" ]; then
  while kill -0 "$WAIT_PID" 2>/dev/null; do sleep 60; done
  echo "$(date -u +%H:%M:%S) pid $WAIT_PID has exited"
fi

fit_steps() {  # OUT SCRIPT ARGS... -> a step count that fits BUDGET at the measured seconds per step (multiple of 100)
  local out=$1 sps; shift
  sps=$($PY "$@" --output "$out" --time-steps 20 2>/dev/null | tail -1 | $PY -c 'import json,sys; print(json.load(sys.stdin)["seconds_per_step"])')
  echo "$(date -u +%H:%M:%S) $1: $sps s/step" >&2
  $PY -c "print(max(1000, int(0.95 * $BUDGET / $sps) // 100 * 100))"
}

train() {  # NAME SCRIPT ARGS...
  local name=$1; shift
  local out=$ZOO/$name steps
  if [ -f "$out/model_index.json" ] && [ -f "$ZOO/$name-teacher.json" ]; then
    echo "$name: finished already ($out)"; return
  fi
  if [ -f "$ZOO/$name.steps" ]; then steps=$(cat "$ZOO/$name.steps"); else
    steps=$(fit_steps "$out" "$@"); echo "$steps" > "$ZOO/$name.steps"; fi
  echo "$(date -u +%H:%M:%S) $name: $* --output $out --steps $steps --max-seconds $((BUDGET * 115 / 100))"
  $PY "$@" --output "$out" --steps "$steps" --max-seconds $((BUDGET * 115 / 100)) \
      --results "$ZOO/$name-teacher.json" > "$ZOO/$name.log" 2>&1
  echo "$(date -u +%H:%M:%S) $name: exit $? (log $ZOO/$name.log)"
}

train vpred benchmarks/ddpm_teacher.py --prediction-type v_prediction --layout project --threads 1
train dit benchmarks/dit_teacher.py --threads 1
