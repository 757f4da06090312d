#!/usr/bin/env bash
# Makes the small records that the report tests read (tests/data/report/), one file per kind of record:
#   run.jsonl      a descent on the tiny GPT-2 with snapshots and top-3 lists, and an orthogonal walk on a d = 10 MLP
#   exact.jsonl    a sequential (exact) inversion of the tiny GPT-2, and lminv invert of states it wrote itself
#   sweep.jsonl    the sequential search over 3 prompts at a grid of optimizer.policy x model.blocks (2 x 2)
#   compare.jsonl  the tiny GPT-2 in f32 across backend.name=reference,torch,onednn
#   train.jsonl    lminv train of tests/data/tiny-gpt2-train.ini (40 steps, checkpoints at 20 and 40)
#   across.jsonl   invertibility across training: the sequential search and a descent over those checkpoints
#                  (lminv sweep --checkpoints), 2 prompts
# Run from anywhere: bash tests/tools/make-report-records.sh [build/bin/lminv]. Paths in the records are relative to
# the repository. The records are data for tests: re-made only when their format changes.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
lminv=${1:-build/bin/lminv}
out=tests/data/report
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -f "$out"/*.jsonl
common=(--set output.cache_dir="$work/cache" --set output.report=false)

"$lminv" run tests/data/tiny-gpt2.ini "${common[@]}" --set output.dir="$work/run" \
  --set output.snapshot_steps="1 10 20 30" --set decoder.top_k=3 >/dev/null
"$lminv" run configs/seed/orthogonal-walk-mlp-d10-f64.ini "${common[@]}" --set output.dir="$work/run" >/dev/null
mv "$work/run/records.jsonl" "$out/run.jsonl"

"$lminv" run tests/data/tiny-gpt2-sequential.ini "${common[@]}" --set output.dir="$work/exact" >/dev/null
"$lminv" forward tests/data/tiny-gpt2-sequential.ini "${common[@]}" --set prompt.text="Hello world, again." \
  --out "$work/states.safetensors" >/dev/null
"$lminv" invert tests/data/tiny-gpt2-sequential.ini "${common[@]}" --set output.dir="$work/exact" \
  --states "$work/states.safetensors" >/dev/null
mv "$work/exact/records.jsonl" "$out/exact.jsonl"

"$lminv" sweep tests/data/tiny-gpt2-sequential.ini "${common[@]}" --prompts tests/data/prompts-tiny.txt --limit 3 \
  --grid optimizer.policy=linearized,gradient --grid model.blocks=1,2 --records "$out/sweep.jsonl" >/dev/null
rm -f "$out/sweep-summary.json" "$out/sweep-summary.md"

"$lminv" compare tests/data/tiny-gpt2.ini "${common[@]}" --set output.dir="$work/compare" --set backend.dtype=f32 \
  --across backend.name=reference,torch,onednn --table "$out/compare.jsonl" >/dev/null
"$lminv" train tests/data/tiny-gpt2-train.ini "${common[@]}" --set output.dir="$work/train" >/dev/null
mv "$work/train/train.jsonl" "$out/train.jsonl"
"$lminv" sweep tests/data/tiny-gpt2-sequential.ini tests/data/tiny-gpt2.ini "${common[@]}" --checkpoints "$work/train" \
  --prompts tests/data/prompts-tiny.txt --limit 2 --records "$out/across.jsonl" >/dev/null
rm -f "$out/across-summary.json" "$out/across-summary.md"
wc -l "$out"/*.jsonl
