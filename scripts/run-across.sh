#!/usr/bin/env bash
# Invertibility across training (issue #15, item 4): the chosen inversion experiments on every checkpoint of a
# training run, then one table per checkpoint (scripts/across-summary.py). Resumable: run it again after an
# interrupt, or after more checkpoints appeared, and only the missing runs are made.
#   bash scripts/run-across.sh [TRAINING_DIR] [OUT_DIR]     (default models/lminv-gpt2-d128 runs/across)
# Experiments, on "The sky is blue." (configs/train/sky.txt):
#   descent with the LM head, N = 2000 (configs/seed/trained/gpt2-1block-lmhead-N2000.ini): iterations to (4)
#   descent without a head, N = 200 (gpt2-1block-nohead-N200.ini): iterations to (4), exact recovery
#   clamped walk through 12 blocks (clamped-walk-gpt2-12blocks.ini): r
# and the exact sequential search at block 12 on the first 5 prompts of tests/data/prompts-20.txt
# (configs/exact/gpt2-small-block12.ini): success, candidates verified per position, time.
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-models/lminv-gpt2-d128}
out=${2:-runs/across}
mkdir -p "$out"
build/bin/lminv sweep configs/seed/trained/gpt2-1block-lmhead-N2000.ini configs/seed/trained/gpt2-1block-nohead-N200.ini \
  configs/seed/trained/clamped-walk-gpt2-12blocks.ini --checkpoints "$run" --prompts configs/train/sky.txt \
  --records "$out/seed.jsonl"
build/bin/lminv sweep configs/exact/gpt2-small-block12.ini --checkpoints "$run" --prompts tests/data/prompts-20.txt \
  --limit 5 --records "$out/exact.jsonl"
python3 scripts/across-summary.py "$out/seed.jsonl" "$out/exact.jsonl" | tee "$out/across.md"
