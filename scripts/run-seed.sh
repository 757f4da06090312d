#!/usr/bin/env bash
# Runs the seed study's experiments (configs/seed/, docs/seed-results.md) with build/bin/lminv, one after another.
# A config whose header has a "# seeds: 0 1 2" line runs once per seed (--set model.seed=N: the weights, the start
# and the control noise). Each run appends its record to runs/seed/<name>/records.jsonl and its printout to
# runs/seed/<name>/log.txt; python3 scripts/seed-summary.py tabulates them.
#   bash scripts/run-seed.sh                       # every untrained experiment (configs/seed/*.ini)
#   bash scripts/run-seed.sh --trained             # also configs/seed/trained/ (needs models/gpt2, models/gpt2-xl)
#   bash scripts/run-seed.sh configs/seed/pinv-round-trip.ini ...
# With --weights PATH every run reads that Hugging Face folder (--set model.weights=PATH; the folder's config.json
# gives the sizes), and its records go to runs/seed-LABEL/ (--label LABEL, default the folder's name): the trained
# half of the study on a model lminv trained (docs/training.md). Configs asking for more blocks than the model has
# are skipped with a note. --set section.key=value (repeatable) is passed to every run.
#   bash scripts/run-seed.sh --weights models/lminv-gpt2-d128/checkpoint-0002200 --label trained configs/seed/trained/*.ini
set -euo pipefail
cd "$(dirname "$0")/.."
configs=()
trained=0
weights=""
label=""
sets=()  # more --set options for every run
while (($#)); do
  case "$1" in
    --trained) trained=1 ;;
    --weights) weights=${2:?--weights needs a folder}; shift ;;
    --label) label=${2:?--label needs a name}; shift ;;
    --set) sets+=(--set "${2:?--set needs section.key=value}"); shift ;;
    *) configs+=("$1") ;;
  esac
  shift
done
runs=runs/seed
extra=()
layers=""
if [[ -n "$weights" ]]; then
  [[ -f "$weights/config.json" ]] || { echo "run-seed: --weights $weights: no config.json there" >&2; exit 1; }
  runs=runs/seed-${label:-$(basename "$weights")}
  extra=(--set "model.weights=$weights")
  layers=$(python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); print(c.get("n_layer") or c.get("num_hidden_layers") or "")' "$weights/config.json")
fi
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
  blocks=$(sed -n 's/^blocks *= *//p' "$config" | head -1)
  if [[ -n "$layers" && -n "$blocks" && "$blocks" =~ ^[0-9]+$ ]] && ((blocks > layers)); then
    echo "== $name: skipped (blocks = $blocks, the model has $layers)"
    continue
  fi
  seeds=$(sed -n 's/^# seeds: *//p' "$config")
  [[ -n "$seeds" ]] || seeds=0
  mkdir -p "$runs/$name"
  for seed in $seeds; do
    t0=$SECONDS
    echo "== $name (seed $seed)"
    set +e
    build/bin/lminv run "$config" --set output.progress=off --set model.seed="$seed" "${extra[@]}" "${sets[@]}" \
      --set output.dir="$runs/$name" 2>&1 | tee -a "$runs/$name/log.txt" >"$runs/$name/last.txt"
    status=${PIPESTATUS[0]}
    set -e
    grep -E "^  (result|recovered|output distance|input distance|next token)|[Ee]rror" "$runs/$name/last.txt" || true
    echo "   $((SECONDS - t0)) s"
    ((status == 0)) || failed+=("$name (seed $seed)")
  done
done
echo "run-seed: ${#configs[@]} configs in $((SECONDS - start)) s"
if ((${#failed[@]})); then
  printf 'run-seed: failed: %s\n' "${failed[@]}" >&2
  exit 1
fi
