#!/usr/bin/env bash
# Language-model perplexity (PTB, WikiText-2, or any tokenised corpus): a dense LSTM LM beside
# rshare ones.
# Steps: prepare (fairseq-preprocess), train (fairseq-train), evaluate (fairseq-eval-lm on
# test), then one results JSON per run in $WORK/results (recipes/results_table.py tabulates).
#
# Variables (environment), defaults in brackets:
#   CORPUS    a name: ptb, wikitext2 (downloaded if absent), or your own with DATA set  [ptb]
#   DATA      folder with train.txt, valid.txt, test.txt  [../shared/data/$CORPUS if there (or
#             $RSHARE_DATA/$CORPUS), else ~/.cache/fairseq-rshare/data/$CORPUS, downloaded once
#             and SHA-256 checked by recipes/fetch_data.py; RSHARE_DATA_MIRROR=URL: another source]
#   PRESET    cpu   : 2x200 LSTM (Zaremba et al.'s small model), tens of minutes on 2 cores
#             gpu   : 2x650 LSTM with dropout 0.5 (Zaremba's medium model), 40 epochs
#             smoke : 1x64 LSTM, 100 updates (what CI runs)                  [cpu]
#   VARIANTS  space-separated runs                                          [preset's list]
#               dense            fairseq's dense tables (same code, --rshare-tables none)
#               rshare-R         input and output tables random-shared at ratio R of dense
#               rshare-R-input   the input table only
#               rshare-R-freq    both tables, frequency aware: the R*V/2 most frequent words
#                                keep private sub-vectors, the rest share the other half
#   WORK      output folder                                                 [work/lm-$CORPUS-$PRESET]
#   STEPS     any of: prepare train evaluate                                [prepare train evaluate]
#   EXTRA     extra fairseq-train flags, e.g. "--max-update 50"             []
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CORPUS=${CORPUS:-ptb}
DATA=${DATA:-$(source "$HERE/common.sh" && fetch_corpus "$CORPUS")}
PRESET=${PRESET:-cpu}
WORK=${WORK:-work/lm-$CORPUS-$PRESET}
STEPS=${STEPS:-prepare train evaluate}
EXTRA=${EXTRA:-}

source "$HERE/common.sh"
INPUT_TABLES=decoder-input

case $PRESET in
  cpu)
    MODEL="--arch rshare_lstm_lm_ptb_small"
    SCHEDULE="--optimizer adam --lr 0.003 --clip-norm 0.5 --max-tokens 2240 --max-epoch 2"
    [ "$CORPUS" = wikitext2 ] && SCHEDULE="$SCHEDULE --max-update 300"
    DEFAULT_VARIANTS="dense rshare-0.1 rshare-0.01 rshare-0.1-input rshare-0.1-freq"
    [ "$CORPUS" = wikitext2 ] && DEFAULT_VARIANTS="dense rshare-0.1" ;;
  gpu)
    MODEL="--arch rshare_lstm_lm --decoder-layers 2 --decoder-embed-dim 650 --decoder-hidden-size 650
           --decoder-out-embed-dim 650 --dropout 0.5"
    SCHEDULE="--optimizer adam --lr 0.001 --clip-norm 0.25 --max-tokens 700 --max-epoch 40
              --lr-scheduler reduce_lr_on_plateau --lr-shrink 0.25"
    DEFAULT_VARIANTS="dense rshare-0.9 rshare-0.1 rshare-0.01 rshare-0.1-input rshare-0.01-input rshare-0.1-freq" ;;
  smoke)
    MODEL="--arch rshare_lstm_lm --decoder-layers 1 --decoder-embed-dim 64 --decoder-hidden-size 64
           --decoder-out-embed-dim 64"
    SCHEDULE="--optimizer adam --lr 0.01 --clip-norm 0.5 --max-tokens 2240 --max-update 100"
    DEFAULT_VARIANTS="dense rshare-0.1" ;;
  *) die "PRESET=$PRESET: use cpu, gpu or smoke" ;;
esac
VARIANTS=${VARIANTS:-$DEFAULT_VARIANTS}
# fairseq 0.12 silently drops a last batch whose size is not a multiple of 8 (fairseq #5036).
COMMON="--user-dir $HERE/../fairseq_rshare --required-batch-size-multiple 1 --tokens-per-sample 35"
[ "$PRESET" = gpu ] || COMMON="$COMMON --cpu"

require_tools fairseq-preprocess fairseq-train fairseq-eval-lm python3
for variant in $VARIANTS; do variant_flags "$variant" 0 >/dev/null; done

if [[ " $STEPS " == *" prepare "* ]]; then
  for split in train valid test; do
    [ -s "$DATA/$split.txt" ] || die "DATA=$DATA has no $split.txt: point DATA at a folder with train.txt, valid.txt, test.txt"
  done
  step "fairseq-preprocess $DATA -> $WORK/data-bin"
  rm -rf "$WORK/data-bin"
  mkdir -p "$WORK"
  fairseq-preprocess --only-source --trainpref "$DATA/train.txt" --validpref "$DATA/valid.txt" \
    --testpref "$DATA/test.txt" --destdir "$WORK/data-bin" --workers 2 >"$WORK/preprocess.log" 2>&1 \
    || die "fairseq-preprocess failed: see $WORK/preprocess.log"
fi
[ -f "$WORK/data-bin/dict.txt" ] || die "$WORK/data-bin is missing: run the prepare step first (STEPS=prepare)"

mkdir -p "$WORK/results"
for variant in $VARIANTS; do
  run="$WORK/$variant"
  if [[ " $STEPS " == *" train "* ]]; then
    train_variant "$variant" "$run" "$WORK/data-bin" --task language_modeling $COMMON $MODEL \
      $SCHEDULE $(variant_flags "$variant" "$(dictionary_size "$WORK/data-bin/dict.txt")") \
      --sample-break-mode none
  fi
  if [[ " $STEPS " == *" evaluate "* ]]; then
    [ -f "$run/checkpoint_best.pt" ] || die "$run/checkpoint_best.pt is missing: run the train step first"
    step "evaluate $variant on test"
    fairseq-eval-lm "$WORK/data-bin" $COMMON --path "$run/checkpoint_best.pt" --gen-subset test \
      --max-tokens 4096 >"$run/eval.log" 2>&1 || die "evaluating $variant failed: see $run/eval.log"
    record_variant "$variant" "$run" --eval-log "$run/eval.log"
  fi
done
step "done: results in $WORK/results; tabulate with python3 $HERE/results_table.py $WORK/results"
