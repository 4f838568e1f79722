#!/usr/bin/env bash
# Language-model perplexity (PTB, WikiText-2, or any tokenised corpus): a dense LSTM LM beside
# rshare ones, measured the way published LSTM LM results are: --task stateful_lm (the token
# stream cut into parallel streams, the LSTM state carried from batch to batch, every test token
# scored once with the state carried over the whole test stream).
# Steps: prepare (fairseq-preprocess), train (fairseq-train), evaluate (fairseq-eval-lm on
# test), then one results JSON per run in $WORK/results (recipes/results_table.py tabulates).
#
# Variables (environment), defaults in brackets:
#   CORPUS    a name: ptb, wikitext2 (downloaded if absent), or your own with DATA set  [ptb]
#   DATA      folder with train.txt, valid.txt, test.txt  [../shared/data/$CORPUS if there (or
#             $RSHARE_DATA/$CORPUS), else ~/.cache/fairseq-rshare/data/$CORPUS, downloaded once
#             and SHA-256 checked by recipes/fetch_data.py; RSHARE_DATA_MIRROR=URL: another source]
#   PRESET    cpu   : Zaremba et al. (2014)'s small model and schedule: 2x200 LSTM, no dropout,
#                     batch 20 x 20 steps, SGD lr 1 on the summed window loss (--lr 20 on
#                     fairseq's per-token mean, clip 5 -> 0.25) halved every epoch after the
#                     4th, 13 epochs; about an hour per PTB run on 2 cores
#             gpu   : Zaremba's medium model: 2x650, dropout 0.5, 35 steps, lr 1 (--lr 35,
#                     clip 5 -> 0.143) divided by 1.2 every epoch after the 6th, 39 epochs
#             smoke : 2x32 LSTM, Adam, 100 updates (what CI runs)                  [cpu]
#             Every preset trains on the GPU when torch sees one, else on the CPU.
#   VARIANTS  space-separated run names                                    [preset's list]
#             dense, or rshare-R (every table at ratio R of dense) and suffixes, e.g.
#             rshare-0.1-bias, rshare-0.01-input, rshare-0.45-bias-h320-drop0.3; the grammar:
#             python3 -m recipes.variants --help
#   WORK      output folder                                                 [work/lm-$CORPUS-$PRESET]
#   STEPS     any of: prepare train evaluate                                [prepare train evaluate]
#   SEED      the training seed (fairseq's --seed); runs and results of seed N > 1 are named
#             VARIANT-seedN                                                   [1]
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
seeded check >/dev/null  # a bad SEED stops here

case $PRESET in
  cpu)
    MODEL="--arch rshare_lstm_lm_ptb_small"
    SCHEDULE="--optimizer sgd --lr 20 --clip-norm 0.25 --lr-scheduler fixed --force-anneal 5
              --lr-shrink 0.5 --max-epoch 13 --batch-size 20 --tokens-per-sample 20"
    DEFAULT_VARIANTS="dense rshare-0.1-bias rshare-0.01-input" ;;
  gpu)
    MODEL="--arch rshare_lstm_lm --decoder-layers 2 --decoder-embed-dim 650 --decoder-hidden-size 650
           --decoder-out-embed-dim 650 --dropout 0.5"
    SCHEDULE="--optimizer sgd --lr 35 --clip-norm 0.143 --lr-scheduler fixed --force-anneal 7
              --lr-shrink 0.8333 --max-epoch 39 --batch-size 20 --tokens-per-sample 35"
    DEFAULT_VARIANTS="dense rshare-0.1-bias rshare-0.01-bias rshare-0.01-input" ;;
  smoke)
    MODEL="--arch rshare_lstm_lm --decoder-layers 2 --decoder-embed-dim 32 --decoder-hidden-size 32
           --decoder-out-embed-dim 32"
    SCHEDULE="--optimizer adam --lr 0.01 --clip-norm 0.5 --max-update 100 --batch-size 20
              --tokens-per-sample 35"
    DEFAULT_VARIANTS="dense rshare-0.1-bias" ;;
  *) die "PRESET=$PRESET: use cpu, gpu or smoke" ;;
esac
VARIANTS=${VARIANTS:-$DEFAULT_VARIANTS}
# fairseq 0.12 silently drops a last batch whose size is not a multiple of 8 (fairseq #5036).
COMMON="--user-dir $HERE/../fairseq_rshare --required-batch-size-multiple 1 --task stateful_lm $(device_flags)"

require_tools fairseq-preprocess fairseq-train fairseq-eval-lm python3
variants flags lm 0 $VARIANTS >/dev/null

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
  run="$WORK/$(seeded "$variant")"
  if [[ " $STEPS " == *" train "* ]]; then
    start_from_teacher lm "$(dictionary_size "$WORK/data-bin/dict.txt")" "$variant" "$run"
    train_variant "$variant" "$run" "$WORK/data-bin" $COMMON $MODEL $SCHEDULE --batch-size-valid 10 \
      $(variants flags lm "$(dictionary_size "$WORK/data-bin/dict.txt")" "$variant")
  fi
  if [[ " $STEPS " == *" evaluate "* ]]; then
    [ -f "$run/checkpoint_best.pt" ] || die "$run/checkpoint_best.pt is missing: run the train step first"
    step "evaluate $variant on test"
    # One stream, the state carried over the whole test set (as Zaremba et al. evaluate).
    fairseq-eval-lm "$WORK/data-bin" $COMMON --path "$run/checkpoint_best.pt" --gen-subset test \
      --batch-size 1 --tokens-per-sample 35 >"$run/eval.log" 2>&1 || die "evaluating $variant failed: see $run/eval.log"
    record_variant lm "$variant" "$variant" "$run" "$run/checkpoint_best.pt" --eval-log "$run/eval.log" \
      --vocabulary "words, dictionary of $(dictionary_size "$WORK/data-bin/dict.txt")"
  fi
done
step "done: results in $WORK/results; tabulate with python3 $HERE/results_table.py $WORK/results"
