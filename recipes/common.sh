# Shared by lm.sh and translation.sh (sourced): messages, tool checks and the variant names.

die() { echo "$(basename "$0"): error: $*" >&2; exit 1; }
step() { echo "==> $*"; }

require_tools() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null \
      || die "$tool not found: pip install torch==2.13.0 -e \".[test]\" (in this repository)"
  done
}

# variants PART RECIPE WORDS NAME...: PART of each run NAME of RECIPE (lm or translation), one
# line each, for a dictionary of WORDS symbols (for -freq) and this WORK: flags (fairseq-train's),
# compress (fairseq-rshare-compress's arguments), teacher (its checkpoint) or stage; a bad name
# stops the recipe with one line. The names' grammar is recipes/variants.py
# (python3 -m recipes.variants --help).
variants() {
  PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}" python3 -m recipes.variants "$2" --words "$3" \
    --work "$WORK" --seed "${SEED:-1}" --print "$1" "${@:4}" || exit 1
}

# start_from_teacher RECIPE WORDS NAME RUN_DIR: a run that starts from its teacher (a dense run of
# the same WORK and seed) needs the teacher's checkpoint; one that starts compressed gets its
# compressed checkpoint from fairseq-rshare-compress before its training starts (not again on a
# resume), with the command's log and wall time beside it ($WORK/compressed/NAME.log,
# NAME.seconds, NAME-seedN.* for seed N > 1).
start_from_teacher() {
  local teacher compress start log name
  teacher=$(variants teacher "$1" "$2" "$3")
  [ -z "$teacher" ] && return
  name=$(basename "$(dirname "$teacher")")
  [ -f "$teacher" ] || die "$3 starts from $teacher, which is missing: train and evaluate its teacher first (VARIANTS=${name%-seed${SEED:-1}}${SEED:+ SEED=$SEED})"
  compress=$(variants compress "$1" "$2" "$3")
  if [ -n "$compress" ] && [ ! -f "$4/checkpoint_last.pt" ]; then
    log="$WORK/compressed/$(seeded "$3")"
    step "compress $teacher for $3, log: $log.log"
    mkdir -p "$WORK/compressed"
    start=$(date +%s)
    fairseq-rshare-compress $compress --data "$WORK/data-bin" >"$log.log" 2>&1 \
      || die "compressing the teacher of $3 failed: see $log.log"
    echo $(( $(date +%s) - start )) >"$log.seconds"
  fi
}

# train_variant NAME RUN_DIR FAIRSEQ_TRAIN_ARGS...: train one run into RUN_DIR (no epoch
# checkpoints unless CHECKPOINTS gives other flags, e.g. --keep-last-epochs 3); the command is
# kept in RUN_DIR/train.cmd, its log in train.log (record_result.py reads the wall time from it).
# A RUN_DIR holding checkpoint_last.pt (a run stopped on the way) is resumed from it, as
# fairseq-train does; delete RUN_DIR to start that run over.
train_variant() {
  local name=$1 run=$2
  shift 2
  rm -f "$WORK/results/$(seeded "$name").json"
  if [ -f "$run/checkpoint_last.pt" ]; then
    step "resume $name ($PRESET preset) from $run/checkpoint_last.pt, log: $run/train.log"
  else
    step "train $name ($PRESET preset), log: $run/train.log"
    rm -rf "$run"
  fi
  mkdir -p "$run"
  printf '%q ' fairseq-train "$@" --seed "${SEED:-1}" --save-dir "$run" ${CHECKPOINTS:---no-epoch-checkpoints} \
    --log-format simple --log-interval 50 --no-progress-bar $EXTRA >"$run/train.cmd"
  PYTHONUNBUFFERED=1 bash "$run/train.cmd" >>"$run/train.log" 2>&1 \
    || die "training $name failed: see $run/train.log"
  grep "| valid |" "$run/train.log" | sed 's/.*| valid |/    valid |/' | tail -3
}

# seeded NAME: NAME for the training seed 1 (SEED unset), else NAME-seedN: the run folder and
# results file of that seed (the JSON's variant stays NAME; results_table.py averages the seeds).
seeded() {
  [[ ${SEED:-1} =~ ^[1-9][0-9]*$ ]] || die "SEED=$SEED: give the training seed as a whole number from 1"
  if [ "${SEED:-1}" = 1 ]; then echo "$1"; else echo "$1-seed$SEED"; fi
}

# record_variant RECIPE VARIANT NAME RUN_DIR CHECKPOINT METRIC_ARGS...: write
# $WORK/results/NAME.json (recipes/record_result.py) for the evaluated CHECKPOINT of run VARIANT,
# with how it started, for a run that starts from its teacher the teacher's results, and for one
# that starts compressed what the compression reported.
record_variant() {
  local recipe=$1 variant=$2 name=$3 run=$4 checkpoint=$5 teacher log
  shift 5
  teacher=$(variants teacher "$recipe" 0 "$variant")
  if [ -n "$teacher" ]; then
    set -- "$@" --teacher-result "$WORK/results/$(basename "$(dirname "$teacher")").json"
  fi
  if [ -n "$(variants compress "$recipe" 0 "$variant")" ]; then
    log="$WORK/compressed/$(seeded "$variant")"
    set -- "$@" --compress-log "$log.log"
    if [ -f "$log.seconds" ]; then
      set -- "$@" --compress-seconds "$(cat "$log.seconds")"
    fi
  fi
  python3 "$HERE/record_result.py" --out "$WORK/results/$(seeded "$name").json" --corpus "$CORPUS" \
    --preset "$PRESET" --variant "$name" --checkpoint "$checkpoint" \
    --train-log "$run/train.log" \
    --command-file "$run/train.cmd" --stage "$(variants stage "$recipe" 0 "$variant")" "$@"
}

# device_flags: --cpu unless torch sees a GPU. Every preset runs where it is (the cpu preset's
# model and schedule on a GPU too); fairseq itself would fall back to the CPU without one.
device_flags() {
  python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null || echo --cpu
}

# dictionary_size DICT: fairseq's vocabulary size for a dict.txt (its words + 4 special symbols).
dictionary_size() { echo $(( $(wc -l <"$1") + 4 )); }

# require_modules MODULE...: stop unless python3 imports each (setup.py's recipes extra).
require_modules() {
  local module
  for module in "$@"; do
    python3 -c "import $module" 2>/dev/null \
      || die "python module $module not found: pip install torch==2.13.0 -e \".[recipes]\" (in this repository)"
  done
}

# fetch_corpus NAME: print the folder of corpus NAME for an unset DATA: ../shared/data/NAME (or
# $RSHARE_DATA/NAME) where it exists, as on CI; otherwise ~/.cache/fairseq-rshare/data/NAME
# (under $XDG_CACHE_HOME when set), downloaded there and checked by recipes/fetch_data.py, whose
# progress goes to stderr and whose error ends the recipe's one error line.
fetch_corpus() {
  local shared=${RSHARE_DATA:-$HERE/../../shared/data}/$1
  local cache=${XDG_CACHE_HOME:-$HOME/.cache}/fairseq-rshare/data/$1 error
  if [ -d "$shared" ]; then echo "$shared"; return; fi
  { error=$(python3 "$HERE/fetch_data.py" "$1" "$cache" 2>&1 >&3); } 3>&2 \
    || die "${error#fetch_data.py: error: }; or set DATA to a folder holding the $1 files"
  echo "$cache"
}
