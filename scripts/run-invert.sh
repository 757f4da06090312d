#!/usr/bin/env bash
# lminv invert on states made by another computation than the inverting one (bench/RESULTS.md, "Captured states"):
# untrained GPT-2 small (seed 0) saved as a Hugging Face folder, the first N prompts of tests/data/prompts-20.txt,
# states after block 12 (head none) from
#   lminv's torch backend in bf16                          (lminv forward, one file per prompt)
#   the independent PyTorch implementation (tests/tools/capture_states.py) in float32, float64, bfloat16, float16
#   compute, float32 states stored as float16, and float32 states with Gaussian noise of relative size sigma,
# each inverted by the sequential search on the torch backend in f32 (configs/exact/gpt2-small-block12.ini).
# Resumable: a set already made is kept, a sweep already recorded is skipped. Then the summary table.
#   bash scripts/run-invert.sh [N] [sets]   (N prompts, default 10; the noise sets use min(N, 5); "sets": only make
#                                            the states sets, no inversions)
#   bash scripts/run-invert.sh [N] families the other families (Llama, Mistral, Qwen2, GPT-NeoX): an untrained model of
#                                            each, 8 blocks of d 512 (lminv init), its states after the last block from
#                                            capture_states.py in float64, float32 and bfloat16, each inverted by the
#                                            sequential search on onednn f32; then their table
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-10}
out=runs/invert
config=configs/exact/gpt2-small-block12.ini
py=/usr/bin/python3
capture() { $py -B tests/tools/capture_states.py "$@"; }
lminv() { build/bin/lminv "$@" 2>&1 | grep --line-buffered -v "^lminv: warning: refused plugin"; }
mkdir -p $out/sets

head -n "$n" tests/data/prompts-20.txt > $out/prompts.jsonl
head -n "$(( n < 5 ? n : 5 ))" tests/data/prompts-20.txt > $out/prompts-noise.jsonl

if [[ ${2:-all} == families ]]; then
  fam_out=$out/families
  mkdir -p $fam_out/sets $fam_out/records
  for family in llama mistral qwen2 gpt_neox; do
    ini=$fam_out/$family.ini
    if [[ $family == gpt_neox ]]; then shape="n_inner = 2048"; else shape=$'n_inner = 1376\nn_kv_head = 2'; fi
    cat > $ini <<INI
# Written by scripts/run-invert.sh: an untrained $family of 8 blocks, d 512, the exact-inversion settings of
# configs/exact/gpt2-small-block12.ini.
[model]
family = $family
weights = random
seed = 0
n_layer = 8
n_embd = 512
n_head = 8
$shape
n_positions = 64
blocks = 8
head = none
input = embedding

[backend]
name = onednn
dtype = f32

[optimizer]
name = sequential
policy = linearized
batch = 16

[decoder]
name = nearest

[output]
dir = $fam_out/$family-runs
INI
    [[ -f $fam_out/$family/config.json ]] || lminv init $ini --out $fam_out/$family
    for compute in float64 float32 bfloat16; do
      set=$family-pytorch-$compute
      [[ -f $fam_out/sets/$set.jsonl ]] || capture --model $fam_out/$family --blocks 8 --prompts $out/prompts.jsonl \
        --compute $compute --store $compute --out $fam_out/sets/$set.jsonl
      lminv sweep $ini --states $fam_out/sets/$set.jsonl --set model.weights=$fam_out/$family \
        --records $fam_out/records/$set.jsonl
    done
  done
  # Qwen2's q/k/v biases start at zero (as Hugging Face initialises them), which makes its states a Llama's: the same
  # folder with biases drawn from N(0, 0.02) checks the bias path too (float32).
  if [[ ! -f $fam_out/qwen2-bias/model.safetensors ]]; then
    $py - $fam_out/qwen2 $fam_out/qwen2-bias <<'PY'
import os, shutil, sys
sys.path.insert(0, "tests/tools")
import numpy as np
import capture_states as c
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
for f in os.listdir(src):
    if f != "model.safetensors":
        shutil.copy(os.path.join(src, f), dst)
tensors, _, dtypes = c.read_safetensors(os.path.join(src, "model.safetensors"))
rng = np.random.default_rng(7)
out = {}
for name, a in tensors.items():
    if name.endswith(".bias"):
        a = rng.normal(0, 0.02, a.shape)
    out[name] = (dtypes[name], list(a.shape), a.astype("<f4").tobytes())
c.write_safetensors(os.path.join(dst, "model.safetensors"), out, {"format": "pt"})
PY
  fi
  sed "s#^dir = .*#dir = $fam_out/qwen2-bias-runs#" $fam_out/qwen2.ini > $fam_out/qwen2-bias.ini
  set=qwen2-biases-pytorch-float32
  [[ -f $fam_out/sets/$set.jsonl ]] || capture --model $fam_out/qwen2-bias --blocks 8 --prompts $out/prompts.jsonl \
    --compute float32 --store float32 --out $fam_out/sets/$set.jsonl
  lminv sweep $fam_out/qwen2-bias.ini --states $fam_out/sets/$set.jsonl --set model.weights=$fam_out/qwen2-bias \
    --records $fam_out/records/$set.jsonl
  $py scripts/invert-summary.py $fam_out/records/*.jsonl
  exit 0
fi

[[ -f $out/gpt2-small/config.json ]] || lminv init $config --out $out/gpt2-small
make_set() {  # NAME ARGS...: a states set made by capture_states.py, once
  local name=$1; shift
  [[ -f $out/sets/$name.jsonl ]] || capture --model $out/gpt2-small --blocks 12 --out $out/sets/$name.jsonl "$@"
}
make_set pytorch-f64 --prompts $out/prompts.jsonl --compute float64 --store float64
make_set pytorch-f32 --prompts $out/prompts.jsonl --compute float32 --store float32
make_set pytorch-f32-stored-f16 --prompts $out/prompts.jsonl --compute float32 --store float16
make_set pytorch-f16 --prompts $out/prompts.jsonl --compute float16 --store float16
make_set pytorch-bf16 --prompts $out/prompts.jsonl --compute bfloat16 --store bfloat16
for sigma in 0.001 0.01 0.03 0.1 0.2 0.3; do
  make_set pytorch-f32-noise-$sigma --prompts $out/prompts-noise.jsonl --compute float32 --store float32 --sigma $sigma
done
# lminv's own torch backend in bf16: one lminv forward per prompt, and a manifest of them.
if [[ ! -f $out/sets/lminv-torch-bf16.jsonl ]]; then
  mkdir -p $out/sets/lminv-torch-bf16
  i=0
  while read -r line; do
    ids=$($py -c 'import json,sys; print(",".join(map(str, json.loads(sys.argv[1])["ids"])))' "$line")
    lminv forward $config --force --out $out/sets/lminv-torch-bf16/$i.safetensors --set prompt.text= --set prompt.ids=$ids \
      --set backend.dtype=bf16 --set output.dir=$out/forward > /dev/null
    echo "{\"states\": \"lminv-torch-bf16/$i.safetensors\"}" >> $out/sets/lminv-torch-bf16.jsonl.tmp
    i=$((i + 1))
  done < $out/prompts.jsonl
  mv $out/sets/lminv-torch-bf16.jsonl.tmp $out/sets/lminv-torch-bf16.jsonl
fi

[[ ${2:-all} == sets ]] && exit 0


# The inversions (torch f32). Noisy sets: at most 512 candidates per position, so that a position whose state no
# token reproduces costs seconds, not the whole vocabulary.
for set in lminv-torch-bf16 pytorch-f64 pytorch-f32 pytorch-f32-stored-f16 pytorch-f16 pytorch-bf16; do
  lminv sweep $config --states $out/sets/$set.jsonl --set model.weights=$out/gpt2-small \
    --records $out/records/$set.jsonl
done
for sigma in 0.001 0.01 0.03 0.1 0.2 0.3; do
  lminv sweep $config --states $out/sets/pytorch-f32-noise-$sigma.jsonl --set model.weights=$out/gpt2-small \
    --set optimizer.max_candidates=512 --records $out/records/pytorch-f32-noise-$sigma.jsonl
done
$py scripts/invert-summary.py $out/records/*.jsonl
