#!/usr/bin/env bash
# What benchmarks/gpu_session.py needs on a GPU machine that has PyTorch but no network and no
# fairseq, put into this checkout (both folders ignored by git, through .git/info/exclude):
#   .whl/       the wheels of fairseq and of its dependencies missing there, for CPython 3.12 on
#               manylinux x86_64 (antlr4-python3-runtime has no wheel on PyPI: built here)
#   .gpu-data/  the corpora (ptb, wikitext2, multi30k) from $RSHARE_DATA [../shared/data]
# Run it from the repository root; it prints the folders' sizes.
set -euo pipefail

WHEELS=(ve-fairseq==0.12.3 hydra-core==1.3.8 omegaconf==2.3.1 bitarray==3.12.3)
SOURCE_ONLY=(antlr4-python3-runtime==4.9.3)
CORPORA=(ptb wikitext2 multi30k)
DATA=${RSHARE_DATA:-../shared/data}

[ -f setup.py ] && [ -d fairseq_rshare ] || { echo "gpu_prepare.sh: run it from the repository root" >&2; exit 1; }
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for folder in /.whl/ /.gpu-data/; do
  grep -qxF "$folder" "$exclude" 2>/dev/null || echo "$folder" >>"$exclude"
done

rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${WHEELS[@]}"
python3 -m pip wheel -q --no-deps -w .whl "${SOURCE_ONLY[@]}"

rm -rf .gpu-data
mkdir -p .gpu-data
for corpus in "${CORPORA[@]}"; do
  [ -d "$DATA/$corpus" ] || { echo "gpu_prepare.sh: $DATA/$corpus is missing: set RSHARE_DATA to the corpora's folder" >&2; exit 1; }
  cp -r "$DATA/$corpus" .gpu-data/
done
du -sh .whl .gpu-data
