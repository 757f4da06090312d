#!/usr/bin/env bash
# Runs every experiment of configs/seed/ (or those named) with build/bin/lminv, one after another.
# Each appends its record to runs/seed/<name>/records.jsonl and its printout to runs/seed/<name>/log.txt.
#   bash scripts/run-seed.sh                       # all of them (about 20 minutes on 2 cores)
#   bash scripts/run-seed.sh configs/seed/pinv-round-trip.ini ...
set -euo pipefail
cd "$(dirname "$0")/.."
configs=("$@")
((${#configs[@]})) || configs=(configs/seed/*.ini)
for config in "${configs[@]}"; do
  name=$(basename "$config" .ini)
  mkdir -p "runs/seed/$name"
  echo "== $name"
  build/bin/lminv run "$config" --set output.progress=off | tee -a "runs/seed/$name/log.txt" |
    grep -E "result|recovered|output distance|ratio|time" || true
done
