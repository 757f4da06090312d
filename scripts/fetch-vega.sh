#!/usr/bin/env bash
# Fetches the plotting library `lminv report` inlines into its pages (docs/reports.md):
#   vega@6.4.0 build/vega.min.js, vega-lite@6.5.0 build/vega-lite.min.js, vega-embed@7.3.0 build/vega-embed.min.js
#   -> data/vega/ with their LICENSE files (all three BSD-3-Clause) and VERSIONS (name@version per line)
# Each archive comes from `npm pack` (the npm registry) and is checked against the sha256 pinned below before it is
# unpacked. Does nothing when data/vega is complete; data/ is not in git.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/data/vega"
declare -A version=([vega]=6.4.0 [vega-lite]=6.5.0 [vega-embed]=7.3.0)
declare -A sha256=(
  [vega]=3521fb6ff68a94a40323954f0ba4484ba4014b157bfd37f89a3b063082320c42
  [vega-lite]=811230a6bfd2cdbfc359d0c38f624a90df86657b7f251b67be88bcc4eee32b7f
  [vega-embed]=d9a958ced3240f0418df7d5e12e97dba6e63cecda15b8403e47a0db7eb6ea859
)
want="vega@${version[vega]} vega-lite@${version[vega-lite]} vega-embed@${version[vega-embed]}"
if [[ -s "$dest/vega.min.js" && -s "$dest/vega-lite.min.js" && -s "$dest/vega-embed.min.js" &&
  "$(tr '\n' ' ' <"$dest/VERSIONS" 2>/dev/null | sed 's/ $//')" == "$want" ]]; then
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/out"
for name in vega vega-lite vega-embed; do
  archive="$name-${version[$name]}.tgz"
  (cd "$work" && npm pack --silent "$name@${version[$name]}" >/dev/null)
  echo "${sha256[$name]}  $work/$archive" | sha256sum --check --quiet - ||
    { echo "fetch-vega: $archive does not have the expected sha256" >&2; exit 1; }
  mkdir -p "$work/$name"
  tar -xzf "$work/$archive" -C "$work/$name"
  mv "$work/$name/package/build/$name.min.js" "$work/out/"
  mv "$work/$name/package/LICENSE" "$work/out/LICENSE-$name"
  echo "$name@${version[$name]}" >>"$work/out/VERSIONS"
done
mkdir -p "$(dirname "$dest")"
rm -rf "$dest.tmp" && mv "$work/out" "$dest.tmp"
rm -rf "$dest" && mv "$dest.tmp" "$dest"
echo "fetch-vega: $want in $dest"
