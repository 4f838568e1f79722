#!/usr/bin/env bash
# German->English BLEU on Multi30k or IWSLT14: a dense transformer beside rshare ones.
# Steps: prepare (text splits, sentencepiece subwords, fairseq-preprocess with a joined
# dictionary), train (fairseq-train, --share-all-embeddings), evaluate (fairseq-generate with
# beam search on test, detokenised output scored by sacrebleu, signature printed), then one
# results JSON per run in $WORK/results (recipes/results_table.py tabulates).
#
# Variables (environment), defaults in brackets:
#   CORPUS    multi30k | iwslt14                                            [multi30k]
#   DATA      multi30k: folder with train, val, test2016 .de/.en (raw text) [../shared/data/multi30k
#             if there (or $RSHARE_DATA/multi30k), else ~/.cache/fairseq-rshare/data/multi30k,
#             downloaded once and SHA-256 checked by recipes/fetch_data.py; RSHARE_DATA_MIRROR=URL:
#             another source]
#             iwslt14: the extracted de-en folder of the IWSLT14 archive (train.tags.de-en.*,
#             IWSLT14.*.xml); unset, it is downloaded from $IWSLT14_URL into $WORK/orig
#   IWSLT14_URL                       [http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz]
#   SRC, TGT  source and target language                                    [de, en]
#   PRESET    cpu   : a small transformer (2+2 layers of 256) to convergence: at most 12 epochs,
#                     stopped after 3 without a better validation loss, the last 3 epochs
#                     averaged (1.7-2.2 hours a run, measured with three runs sharing 2 cores)
#             gpu   : transformer_iwslt_de_en (fairseq's IWSLT14 setup), 50 epochs, last 5 averaged
#             smoke : a tiny transformer, 2 epochs (about 230 updates on Multi30k), both
#                     averaged (what CI runs)                                 [cpu]
#             Every preset trains on the GPU when torch sees one, else on the CPU.
#   VARIANTS  space-separated run names                                    [dense rshare-0.1]
#             dense, or rshare-R (the one table shared by encoder input, decoder input and
#             output, at ratio R of dense) and suffixes, e.g. rshare-0.1-freq; a last -untied
#             trains three tables instead (then -input works); the grammar:
#             python3 -m recipes.variants --help
#   VOCAB     joint sentencepiece vocabulary size              [8000; gpu 10000; smoke 2000]
#             (results of another size, or of SUBWORDS=word, are named after it: dense-bpe2000)
#   SUBWORDS  bpe (joint subwords) or word (a word-level vocabulary of at most VOCAB
#             whitespace-separated words, the rest <unk>)                   [bpe]
#   BEAM      beam size                                                     [5]
#   WORK      output folder                                   [work/translation-$CORPUS-$PRESET]
#   STEPS     any of: prepare train evaluate                                [prepare train evaluate]
#   SEED      the training seed (fairseq's --seed); runs and results of seed N > 1 are named
#             VARIANT-seedN                                                   [1]
#   EXTRA     extra fairseq-train flags, e.g. "--max-update 50"             []
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CORPUS=${CORPUS:-multi30k}
SRC=${SRC:-de}
TGT=${TGT:-en}
PRESET=${PRESET:-cpu}
WORK=${WORK:-work/translation-$CORPUS-$PRESET}
STEPS=${STEPS:-prepare train evaluate}
VARIANTS=${VARIANTS:-dense rshare-0.1}
BEAM=${BEAM:-5}
EXTRA=${EXTRA:-}
SUBWORDS=${SUBWORDS:-bpe}
case $SUBWORDS in bpe | word) ;; *) echo "translation.sh: error: SUBWORDS=$SUBWORDS: use bpe or word" >&2; exit 1 ;; esac
IWSLT14_URL=${IWSLT14_URL:-http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz}

source "$HERE/common.sh"
seeded check >/dev/null  # a bad SEED stops here

case $CORPUS in
  multi30k) DATA=${DATA:-$(fetch_corpus multi30k)} ;;
  iwslt14) DATA=${DATA:-} ;;
  *) die "CORPUS=$CORPUS: use multi30k or iwslt14" ;;
esac
case $PRESET in
  cpu)
    MODEL="--arch rshare_transformer --encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 256
           --decoder-embed-dim 256 --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512
           --encoder-attention-heads 4 --decoder-attention-heads 4 --dropout 0.1"
    SCHEDULE="--lr 0.002 --warmup-updates 200 --max-tokens 4096 --max-epoch 12 --patience 3"
    AVERAGE=3
    DEFAULT_VOCAB=8000 ;;
  gpu)
    MODEL="--arch rshare_transformer_iwslt_de_en --dropout 0.3"
    SCHEDULE="--lr 0.0005 --warmup-updates 4000 --max-tokens 4096 --max-epoch 50"
    AVERAGE=5
    DEFAULT_VOCAB=10000 ;;
  smoke)
    MODEL="--arch rshare_transformer --encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 128
           --decoder-embed-dim 128 --encoder-ffn-embed-dim 256 --decoder-ffn-embed-dim 256
           --encoder-attention-heads 2 --decoder-attention-heads 2 --dropout 0.0"
    SCHEDULE="--lr 0.005 --warmup-updates 50 --max-tokens 4096 --max-epoch 2"
    AVERAGE=2
    DEFAULT_VOCAB=2000 ;;
  *) die "PRESET=$PRESET: use cpu, gpu or smoke" ;;
esac
VOCAB=${VOCAB:-$DEFAULT_VOCAB}
[[ $VOCAB =~ ^[1-9][0-9]*$ ]] || die "VOCAB=$VOCAB: give the vocabulary size as a whole number, e.g. 8000"
# Results of another vocabulary than the preset's are named after it (dense-bpe2000.json).
VOCAB_SUFFIX=
[ "$SUBWORDS $VOCAB" = "bpe $DEFAULT_VOCAB" ] || VOCAB_SUFFIX="-$SUBWORDS$VOCAB"
CHECKPOINTS="--keep-last-epochs $AVERAGE"  # the epochs the evaluation averages
TRAINING="--criterion label_smoothed_cross_entropy --label-smoothing 0.1
          --optimizer adam --adam-betas (0.9,0.98) --lr-scheduler inverse_sqrt --weight-decay 0.0001
          --clip-norm 0.0"
# fairseq 0.12 silently drops a last batch whose size is not a multiple of 8 (fairseq #5036).
COMMON="--user-dir $HERE/../fairseq_rshare --required-batch-size-multiple 1 $(device_flags)"

require_tools fairseq-preprocess fairseq-train fairseq-generate sacrebleu python3
require_modules sentencepiece
variants flags translation 0 $VARIANTS >/dev/null

prepare_text() {
  local text=$WORK/text
  rm -rf "$text"
  mkdir -p "$text"
  if [ "$CORPUS" = multi30k ]; then
    [ -d "$DATA" ] || die "DATA=$DATA is not a folder: point DATA at the Multi30k text (train, val, test2016 .$SRC/.$TGT)"
    for pair in train:train val:valid test2016:test; do
      for lang in "$SRC" "$TGT"; do
        [ -s "$DATA/${pair%%:*}.$lang" ] || die "DATA=$DATA has no ${pair%%:*}.$lang: check DATA and the language pair SRC=$SRC TGT=$TGT"
        cp "$DATA/${pair%%:*}.$lang" "$text/${pair##*:}.$lang"
      done
      [ "$(wc -l <"$text/${pair##*:}.$SRC")" = "$(wc -l <"$text/${pair##*:}.$TGT")" ] \
        || die "$DATA/${pair%%:*}.$SRC and .$TGT differ in length: the files are not parallel"
    done
    return
  fi
  local orig=$DATA
  if [ -z "$orig" ]; then
    orig=$WORK/orig/$SRC-$TGT
    if [ ! -d "$orig" ]; then
      step "download $IWSLT14_URL"
      command -v curl >/dev/null || die "curl not found: install it, or set DATA to a local copy"
      mkdir -p "$WORK/orig"
      curl -fsSL "$IWSLT14_URL" -o "$WORK/orig/archive.tgz" || die "cannot download $IWSLT14_URL: set DATA to a local copy"
      tar -xzf "$WORK/orig/archive.tgz" -C "$WORK/orig" || die "$WORK/orig/archive.tgz is not a valid archive: delete it and retry"
    fi
  fi
  python3 "$HERE/prepare_iwslt14.py" "$orig" "$text" --source-lang "$SRC" --target-lang "$TGT"
}

if [[ " $STEPS " == *" prepare "* ]]; then
  step "prepare $CORPUS text ($SRC->$TGT) in $WORK/text"
  prepare_text
  step "sentencepiece: joint $SUBWORDS vocabulary of $VOCAB, encode every split"
  mkdir -p "$WORK/subwords"
  python3 "$HERE/subwords.py" train --model-prefix "$WORK/subwords/spm" --vocab-size "$VOCAB" --model-type "$SUBWORDS" \
    "$WORK/text/train.$SRC" "$WORK/text/train.$TGT"
  for split in train valid test; do
    for lang in "$SRC" "$TGT"; do
      python3 "$HERE/subwords.py" encode --model "$WORK/subwords/spm.model" --model-type "$SUBWORDS" \
        "$WORK/text/$split.$lang" "$WORK/subwords/$split.$lang"
    done
  done
  step "fairseq-preprocess -> $WORK/data-bin (joined dictionary)"
  rm -rf "$WORK/data-bin"
  fairseq-preprocess --source-lang "$SRC" --target-lang "$TGT" --joined-dictionary \
    --trainpref "$WORK/subwords/train" --validpref "$WORK/subwords/valid" \
    --testpref "$WORK/subwords/test" --destdir "$WORK/data-bin" --workers 2 \
    >"$WORK/preprocess.log" 2>&1 || die "fairseq-preprocess failed: see $WORK/preprocess.log"
fi
[ -f "$WORK/data-bin/dict.$SRC.txt" ] || die "$WORK/data-bin has no dict.$SRC.txt: run the prepare step first (STEPS=prepare), with the same SRC and TGT"

mkdir -p "$WORK/results"
for variant in $VARIANTS; do
  run="$WORK/$(seeded "$variant")"
  if [[ " $STEPS " == *" train "* ]]; then
    start_from_teacher translation "$(dictionary_size "$WORK/data-bin/dict.$SRC.txt")" "$variant" "$run"
    train_variant "$variant$VOCAB_SUFFIX" "$run" "$WORK/data-bin" --task translation --source-lang "$SRC" \
      --target-lang "$TGT" $COMMON $MODEL $TRAINING $SCHEDULE \
      $(variants flags translation "$(dictionary_size "$WORK/data-bin/dict.$SRC.txt")" "$variant")
  fi
  if [[ " $STEPS " == *" evaluate "* ]]; then
    [ -f "$run/checkpoint_last.pt" ] || die "$run/checkpoint_last.pt is missing: run the train step first"
    step "evaluate $variant: the last $AVERAGE epochs averaged, fairseq-generate --beam $BEAM on test, sacrebleu on detokenised output"
    python3 "$HERE/average_checkpoints.py" "$run" --last "$AVERAGE" --output "$run/checkpoint_average.pt" \
      || die "averaging the checkpoints of $variant failed"
    fairseq-generate "$WORK/data-bin" $COMMON --source-lang "$SRC" --target-lang "$TGT" \
      --path "$run/checkpoint_average.pt" --gen-subset test --beam "$BEAM" --batch-size 128 \
      --max-len-a 1.2 --max-len-b 10 --post-process sentencepiece >"$run/generate.log" 2>&1 \
      || die "fairseq-generate failed for $variant: see $run/generate.log"
    grep '^D-' "$run/generate.log" | sed 's/^D-//' | sort -n -k1,1 | cut -f3 >"$run/test.hyp"
    [ "$(wc -l <"$run/test.hyp")" = "$(wc -l <"$WORK/text/test.$TGT")" ] \
      || die "$run/test.hyp has $(wc -l <"$run/test.hyp") lines, the reference $(wc -l <"$WORK/text/test.$TGT"): see $run/generate.log"
    sacrebleu "$WORK/text/test.$TGT" -i "$run/test.hyp" -m bleu -w 2 >"$run/sacrebleu.json"
    cat "$run/sacrebleu.json"
    record_variant translation "$variant" "$variant$VOCAB_SUFFIX" "$run" "$run/checkpoint_average.pt" --generate-log "$run/generate.log" \
      --sacrebleu-json "$run/sacrebleu.json" \
      --vocabulary "joint sentencepiece $SUBWORDS $VOCAB, dictionary of $(dictionary_size "$WORK/data-bin/dict.$SRC.txt")"
  fi
done
step "done: results in $WORK/results; tabulate with python3 $HERE/results_table.py $WORK/results"
