#!/usr/bin/env bash
# The report page in a real browser (docs/reports.md): lminv report writes a page from the committed records of
# every kind (tests/data/report/), headless Chromium opens it from a file:// path with the network cut off (every
# host name resolves to nothing and the proxy is a closed port; the page's own policy allows no fetch either), and
# the page's status (written by its script once every chart has settled) must say that every chart drew an SVG with
# marks and that nothing was logged as an error or warning. A screenshot is left in OUT for people to look at.
#   bash tests/report_browser_test.sh LMINV OUT_DIR SOURCE_DIR
set -euo pipefail
lminv=$1 out=$2 src=$3
chromium=$(command -v chromium || command -v chromium-browser || true)
if [[ -z "$chromium" ]]; then
  echo "report_browser_test: no chromium on PATH; bash scripts/bootstrap.sh test installs Debian's chromium" >&2
  exit 1
fi
rm -rf "$out"
mkdir -p "$out"
data="$src/tests/data/report"
"$lminv" report "$data/run.jsonl" "$data/exact.jsonl" "$data/sweep.jsonl" "$data/compare.jsonl" "$data/train.jsonl" "$data/across.jsonl" \
  --out "$out/report.html" --title "lminv report (test records)"

browse() {  # browse ARGS...: one headless Chromium on the page, offline
  "$chromium" --headless --no-sandbox --disable-gpu --no-first-run --user-data-dir="$out/profile" \
    --host-resolver-rules="MAP * ~NOTFOUND" --proxy-server="127.0.0.1:9" --proxy-bypass-list="<-loopback>" \
    --virtual-time-budget=60000 "$@" "file://$out/report.html"
}
browse --dump-dom >"$out/dom.html" 2>"$out/chromium.log"
browse --hide-scrollbars --window-size=1280,2400 --screenshot="$out/report.png" >/dev/null 2>>"$out/chromium.log"

# The page's status and its charts, checked with Node (npm's runtime, a set-up dependency).
node - "$out/dom.html" "$out/report.html" <<'JS'
const fs = require('fs');
const dom = fs.readFileSync(process.argv[2], 'utf8');
const page = fs.readFileSync(process.argv[3], 'utf8');
const fail = (m) => { console.error('report_browser_test: ' + m); process.exit(1); };
const m = dom.match(/<pre id="lminv-status">([^<]*)<\/pre>/);
if (!m || !m[1]) fail('the page never finished rendering (no status in the dumped DOM)');
const status = JSON.parse(m[1].replace(/&quot;/g, '"').replace(/&lt;/g, '<').replace(/&gt;/g, '>').replace(/&amp;/g, '&'));
const charts = JSON.parse(page.match(/<script type="application\/json" id="lminv-charts">([\s\S]*?)<\/script>/)[1]);
if (status.charts !== charts.length) fail(`status counts ${status.charts} charts, the page has ${charts.length}`);
for (const kind of ['loss', 'walk', 'certificate', 'candidates', 'rates', 'times', 'time-histogram',
                    'candidates-by-position', 'grid', 'compare', 'training-loss', 'training-rates',
                    'across-training'])
  if (!charts.some((c) => c.id.endsWith('-' + kind))) fail(`no ${kind} chart on the page`);
if (status.failed.length) fail('charts not drawn: ' + status.failed.join('; '));
if (status.rendered.length !== charts.length) fail(`${status.rendered.length} of ${charts.length} charts drawn`);
if (status.errors.length) fail('errors logged: ' + status.errors.join('; '));
if (status.warnings.length) fail('warnings logged: ' + status.warnings.join('; '));
for (const c of charts) {  // the dumped DOM holds each chart's SVG
  const at = dom.indexOf(`id="${c.id}"`);
  if (at < 0 || dom.indexOf('<svg', at) < 0) fail(`no SVG for ${c.id} in the DOM`);
}
console.log(`report_browser_test: ${status.rendered.length} charts drawn, no errors or warnings`);
JS
grep -q 'Uncaught' "$out/chromium.log" && { echo "report_browser_test: an uncaught exception in the browser log" >&2; exit 1; }
[[ -s "$out/report.png" ]] || { echo "report_browser_test: no screenshot" >&2; exit 1; }
echo "report_browser_test: screenshot $out/report.png"
