#!/usr/bin/env bash
# Runs the seed study's experiments (configs/seed/, docs/seed-results.md) with build/bin/lminv, one after another.
# A config whose header has a "# seeds: 0 1 2" line runs once per seed (--set model.seed=N: the weights, the start
# and the control noise). Each run appends its record to runs/seed/<name>/records.jsonl and its printout to
# runs/seed/<name>/log.txt; python3 scripts/seed-summary.py tabulates them.
#   bash scripts/run-seed.sh                       # every untrained experiment (configs/seed/*.ini)
#   bash scripts/run-seed.sh --trained             # also configs/seed/trained/ (needs models/gpt2, models/gpt2-xl)
#   bash scripts/run-seed.sh configs/seed/pinv-round-trip.ini ...
set -euo pipefail
cd "$(dirname "$0")/.."
configs=()
trained=0
for arg in "$@"; do
  case "$arg" in
    --trained) trained=1 ;;
    *) configs+=("$arg") ;;
  esac
done
if ((${#configs[@]} == 0)); then
  configs=(configs/seed/*.ini)
  ((trained)) && configs+=(configs/seed/trained/*.ini)
fi
[[ -x build/bin/lminv ]] || { echo "run-seed: build/bin/lminv is missing: bash scripts/bootstrap.sh build" >&2; exit 1; }
start=$SECONDS
failed=()
for config in "${configs[@]}"; do
  [[ -f "$config" ]] || { echo "run-seed: no config $config" >&2; exit 1; }
  name=${config#configs/seed/}
  name=${name%.ini}
  seeds=$(sed -n 's/^# seeds: *//p' "$config")
  [[ -n "$seeds" ]] || seeds=0
  mkdir -p "runs/seed/$name"
  for seed in $seeds; do
    t0=$SECONDS
    echo "== $name (seed $seed)"
    set +e
    build/bin/lminv run "$config" --set output.progress=off --set model.seed="$seed" 2>&1 |
      tee -a "runs/seed/$name/log.txt" >"runs/seed/$name/last.txt"
    status=${PIPESTATUS[0]}
    set -e
    grep -E "^  (result|recovered|output distance|input distance|next token)|[Ee]rror" "runs/seed/$name/last.txt" || true
    echo "   $((SECONDS - t0)) s"
    ((status == 0)) || failed+=("$name (seed $seed)")
  done
done
echo "run-seed: ${#configs[@]} configs in $((SECONDS - start)) s"
if ((${#failed[@]})); then
  printf 'run-seed: failed: %s\n' "${failed[@]}" >&2
  exit 1
fi
