#!/usr/bin/env bash
# Installs lminv to a temporary prefix, builds docs/examples/optimizer-sign-descent as a separate CMake
# project against the installed SDK (find_package(lminv)), then has the installed lminv list and run it.
set -euo pipefail
build_dir=$1 source_dir=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cmake --install "$build_dir" --prefix "$work/prefix" >/dev/null
test -f "$work/prefix/include/lminv/plugin.hpp"
test -f "$work/prefix/lib/cmake/lminv/lminvConfig.cmake"

cmake -S "$source_dir/docs/examples/optimizer-sign-descent" -B "$work/example" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
cmake --build "$work/example" >/dev/null
plugin=$(ls "$work"/example/lminv-plugin-sign-descent.so)

lminv="$work/prefix/bin/lminv"
"$lminv" plugins --plugin-dir "$work/example" | tee "$work/plugins.txt"
grep -E "^optimizer +sign_descent +1\.0\.0 +$plugin" "$work/plugins.txt"
grep -E "^backend +reference " "$work/plugins.txt"  # the installed built-ins are found too

"$lminv" run "$source_dir/tests/data/tiny-fcnet.ini" --plugin-dir "$work/example" \
  --set optimizer.name=sign_descent --set optimizer.steps=40 --set output.dir="$work/out" --set output.cache_dir="$work/cache"
grep -q '"optimizer":"sign_descent"' "$work/out/records.jsonl"
echo "out-of-tree plugin: built against the installed SDK, listed and run"
