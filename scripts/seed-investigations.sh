#!/usr/bin/env bash
# Small experiments that test the likeliest causes of the places where lminv's untrained runs of the seed study
# disagree with it (docs/seed-results.md, "Investigations"). Each is a config of configs/seed/ with a few keys changed,
# run for several seeds into runs/seed-investigations/<name>/; python3 scripts/seed-summary.py runs/seed-investigations
# tabulates them.
#   bash scripts/seed-investigations.sh            # all (about 15 minutes on 2 idle cores)
#   bash scripts/seed-investigations.sh head walk  # only these groups: head walk fcnet blocks nohead restricted
#                                                  # dropout int8 (int8: gpt2-xl sizes, about 15 minutes alone)
set -euo pipefail
cd "$(dirname "$0")/.."
groups=("$@")
((${#groups[@]})) || groups=(head walk fcnet blocks nohead restricted dropout int8)
[[ -x build/bin/lminv ]] || { echo "seed-investigations: build/bin/lminv is missing" >&2; exit 1; }

# run NAME CONFIG SEEDS KEY=VALUE...: the config with those overrides, once per seed.
run() {
  local name=$1 config=$2 seeds=$3
  shift 3
  local sets=()
  for kv in "$@"; do sets+=(--set "$kv"); done
  mkdir -p "runs/seed-investigations/$name"
  for seed in $seeds; do
    build/bin/lminv run "$config" --set output.progress=off --set model.seed="$seed" \
      --set output.dir="runs/seed-investigations/$name" "${sets[@]}" >>"runs/seed-investigations/$name/log.txt"
  done
  echo "== $name"
}

for group in "${groups[@]}"; do
  case "$group" in
    head)  # T1: one block + LM head exact at N = 100? ln_f before the head, and the step size
      for head in lm_head lm_head_no_ln_f; do
        for lr in 0.1 0.01 0.001; do
          run "1block-$head-lr$lr-N100" configs/seed/gpt2-1block-lmhead-N100.ini "0 1 2 3 4" model.head=$head \
            optimizer.lr=$lr optimizer.lr_final="$(python3 -c "print($lr / 10)")"
        done
      done ;;
    walk)  # T2: d_o / d_i of the MLP walk: the study's fixed column Vh[-1] against a random column each step
      for d in 10 50 200 768; do
        run "walk-mlp-d$d-f64-random-column" "configs/seed/orthogonal-walk-mlp-d$d-f64.ini" "0 1 2 3 4" \
          optimizer.index=-1 optimizer.sign=continue
      done ;;
    fcnet)  # T3: the non-invertible FCNet short of m: the step budget
      for steps in 60 240; do
        for lr in 0.1 0.4; do
          run "fcnet-noninvertible-N$steps-lr$lr" configs/seed/fcnet-noninvertible-from-noise.ini "0 1 2" \
            optimizer.steps=$steps optimizer.lr=$lr optimizer.lr_final="$(python3 -c "print($lr / 10)")" \
            output.snapshot_steps=$steps
        done
      done ;;
    blocks)  # T4: two blocks: which head
      for head in none lm_head lm_head_no_ln_f; do
        run "2blocks-$head-N1000" configs/seed/gpt2-2blocks-lmhead-N1000.ini "0 1 2" model.head=$head
      done ;;
    nohead)  # T6: one block without a head, top five: the step size
      for lr in 0.1 0.01; do
        run "1block-nohead-top5-lr$lr-N1000" configs/seed/top5-gpt2-1block-nohead.ini "0 1 2" optimizer.lr=$lr \
          optimizer.lr_final="$(python3 -c "print($lr / 10)")"
      done ;;
    dropout)  # D3: the study's untrained GPT-2 in training mode: dropout 0.1 (torch, which has it) against none
      for p in 0 0.1; do
        for lr in 0.01 0.001; do
          run "1block-lm_head_no_ln_f-lr$lr-N100-dropout$p" configs/seed/gpt2-1block-lmhead-N100.ini "0 1 2 3 4" \
            backend.name=torch model.head=lm_head_no_ln_f model.dropout=$p optimizer.lr=$lr \
            optimizer.lr_final="$(python3 -c "print($lr / 10)")"
        done
        run "2blocks-lm_head_no_ln_f-N1000-dropout$p" configs/seed/gpt2-2blocks-lmhead-N1000.ini "0 1 2" \
          backend.name=torch model.head=lm_head_no_ln_f model.dropout=$p
      done ;;
    int8)  # T7 (S39): gpt2-xl's sizes, 24 and 48 blocks, f32 and int8 block weights, the same descent
      for blocks in 24 48; do
        for wd in same int8; do
          run "xl-${blocks}blocks-$wd" configs/seed/xl-depth-int8.ini "0" model.blocks=$blocks backend.weight_dtype=$wd
          # the loss after the first step, for how far the 200 steps got
          run "xl-${blocks}blocks-$wd-N1" configs/seed/xl-depth-int8.ini "0" model.blocks=$blocks \
            backend.weight_dtype=$wd optimizer.steps=1 output.snapshot_steps=1
        done
      done ;;
    restricted)  # S43: one untrained block with the expanded vocabulary at N = 200: the step size
      for lr in 0.01 0.1; do
        run "restricted-sky-long-1block-N200-lr$lr" configs/seed/restricted-vocab-sky-long-1block-N200.ini "0 1 2" \
          optimizer.lr=$lr optimizer.lr_final="$(python3 -c "print($lr / 10)")"
      done ;;
    *) echo "seed-investigations: no group $group (head walk fcnet blocks nohead restricted dropout int8)" >&2; exit 2 ;;
  esac
done
