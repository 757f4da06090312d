#!/usr/bin/env bash
# The exact-inversion benchmarks of bench/RESULTS.md, one after another (each is resumable: run it again after an
# interruption and it continues). Untrained GPT-2 small, tests/data/prompts-20.txt (100 prompts of 20 tokens).
#   bash scripts/run-exact.sh            # all (about 90 minutes on 2 cores)
#   bash scripts/run-exact.sh sequential # only the sequential search at blocks 12, 6 and 1 (about 25 minutes)
#   bash scripts/run-exact.sh baselines  # brute force and pez
#   bash scripts/run-exact.sh policies   # the paper's gradient policy against linearized
#   bash scripts/run-exact.sh long       # 50 prompts of 100 tokens at block 12
#   bash scripts/run-exact.sh sizes      # GPT-2 medium and large shapes at their last block, 10 prompts
#   bash scripts/run-exact.sh trained [MODEL]  # a model lminv trained (default: the last checkpoint of
#                                        # configs/train/gpt2-d128-12blocks.ini), its step-0 weights beside it
set -euo pipefail
cd "$(dirname "$0")/.."
prompts=tests/data/prompts-20.txt
what=${1:-all}
lminv() { build/bin/lminv "$@" 2>&1 | grep --line-buffered -v "^lminv: warning: refused plugin"; }

if [[ $what == all || $what == sequential ]]; then
  # Blocks 12 (the headline figure), then 6 and 1: the grid resumes the block-12 runs already recorded.
  lminv sweep configs/exact/gpt2-small-block12.ini --prompts $prompts
  lminv sweep configs/exact/gpt2-small-block12.ini --prompts $prompts --grid model.blocks=12,6,1
fi
if [[ $what == all || $what == baselines ]]; then
  # Brute force over the vocabulary, 10 prompts at blocks 1 and 12 (block 12: about 5 minutes per prompt here).
  lminv sweep configs/exact/brute-force.ini --prompts $prompts --limit 10 --set model.blocks=1 \
    --records runs/exact/brute-force/block1.jsonl
  lminv sweep configs/exact/brute-force.ini --prompts $prompts --limit 10 --records runs/exact/brute-force/block12.jsonl
  # The projected-gradient baseline, 10 prompts at block 12, 200 steps each.
  lminv sweep configs/exact/pez.ini --prompts $prompts --limit 10
fi
if [[ $what == all || $what == policies ]]; then
  # The paper's policy (a descended proxy, tokens ranked by embedding distance): 10 prompts at block 1, 1 at block 12.
  lminv sweep configs/exact/gpt2-small-block12.ini --prompts $prompts --limit 10 --set model.blocks=1 \
    --set optimizer.policy=gradient --records runs/exact/policies/gradient-block1.jsonl
  lminv sweep configs/exact/gpt2-small-block12.ini --prompts $prompts --limit 1 --set optimizer.policy=gradient \
    --records runs/exact/policies/gradient-block12.jsonl
fi
if [[ $what == all || $what == long ]]; then
  # 50 prompts of 100 tokens (20 license sentences, 30 random id sequences: bench/prompts-100-tokens.jsonl), block 12.
  lminv sweep configs/exact/gpt2-small-block12.ini --prompts bench/prompts-100-tokens.jsonl \
    --records runs/exact/long/block12-100-tokens.jsonl
fi
if [[ $what == all || $what == sizes ]]; then
  # GPT-2 medium and large shapes (untrained), at their last block, 10 prompts of 20 tokens.
  lminv sweep configs/exact/gpt2-small-block12.ini --prompts $prompts --limit 10 --set model.n_layer=24 \
    --set model.n_embd=1024 --set model.n_head=16 --set model.blocks=24 --records runs/exact/sizes/gpt2-medium-block24.jsonl
  lminv sweep configs/exact/gpt2-small-block12.ini --prompts $prompts --limit 10 --set model.n_layer=36 \
    --set model.n_embd=1280 --set model.n_head=20 --set model.blocks=36 --records runs/exact/sizes/gpt2-large-block36.jsonl
fi
if [[ $what == trained ]]; then
  # Issue #15, item 5: trained weights at the first, middle and last block, both policies, and the same model's
  # starting weights (checkpoint 0) for the untrained figure of the same shape.
  run=models/lminv-gpt2-d128
  model=${2:-$(ls -d $run/checkpoint-* | sort | tail -1)}
  start=$run/checkpoint-0000000
  [[ -f $model/config.json ]] || { echo "run-exact: no trained model at $model: lminv train configs/train/gpt2-d128-12blocks.ini" >&2; exit 1; }
  out=runs/exact/trained
  lminv sweep configs/exact/gpt2-small-block12.ini --prompts $prompts --limit 20 --set model.weights=$model \
    --grid model.blocks=1,6,12 --records $out/linearized.jsonl
  lminv sweep configs/exact/gpt2-small-block12.ini --prompts $prompts --limit 20 --set model.weights=$start \
    --grid model.blocks=1,6,12 --records $out/linearized-step0.jsonl
  # The paper's gradient policy (its proxy ranks poorly on these weights and hands over to the linearized rankings:
  # docs/exact-inversion.md): 2 prompts at block 1, 5 at blocks 6 and 12.
  lminv sweep configs/exact/gpt2-small-block12.ini --prompts $prompts --limit 2 --set model.weights=$model \
    --set optimizer.policy=gradient --set model.blocks=1 --records $out/gradient-block1.jsonl
  lminv sweep configs/exact/gpt2-small-block12.ini --prompts $prompts --limit 5 --set model.weights=$model \
    --set optimizer.policy=gradient --grid model.blocks=6,12 --records $out/gradient-blocks-6-12.jsonl
  # The single-J ranking of before the piecewise one (anchors = 1), what item 5 had to fix: 2 prompts at block 1
  # (at block 12 a position can verify most of the vocabulary, minutes each).
  lminv sweep configs/exact/gpt2-small-block12.ini --prompts $prompts --limit 2 --set model.weights=$model \
    --set optimizer.anchors=1 --set model.blocks=1 --records $out/linearized-anchors1-block1.jsonl
fi
