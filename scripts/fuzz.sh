#!/usr/bin/env bash
# The libFuzzer harnesses of fuzz/ (one per parser; fuzz/RESULTS.md has the figures).
#
#   bash scripts/fuzz.sh build            configure and build build-fuzz (Clang, ASan + UBSan, -DLMINV_FUZZ=ON)
#   bash scripts/fuzz.sh smoke SECONDS    every fuzzer for SECONDS on a copy of its committed corpus, two at a time
#                                         (CI: 20, so about 2 minutes in all); fails if any reports a finding
#                                         (crash, sanitizer report, uncaught exception, leak, timeout, OOM)
#   bash scripts/fuzz.sh long RUNS        every fuzzer for RUNS executions (at most FUZZ_MAX_TIME seconds, default
#                                         3600), growing build-fuzz/long/<fuzzer>/corpus; prints a table
#   bash scripts/fuzz.sh list             the fuzzers' names
#
# Environment: FUZZ_BUILD (build folder, default <repo>/build-fuzz), FUZZERS ("a b": only these), FUZZ_JOBS (build
# jobs, default 2), FUZZ_PARALLEL (smoke mode's fuzzers at a time, default 2), FUZZ_MAX_TIME (long mode's cap per
# fuzzer), FUZZ_NICE (niceness of the fuzzers, default 10).
# Limits, the same in every mode: -timeout=10 (seconds per input), -rss_limit_mb=2048, -malloc_limit_mb=2048.
# Findings are kept in build-fuzz/findings/<fuzzer>/ (crash-*, leak-*, timeout-*, oom-*); rerun one with
#   build-fuzz/bin/<fuzzer>_fuzz build-fuzz/findings/<fuzzer>/crash-...
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${FUZZ_BUILD:-$ROOT/build-fuzz}"
ALL_FUZZERS="safetensors checkpoint gpt2_tokenizer hf_tokenizer tokenizer_encode config prompts records pinv_cache npy
states"
FUZZERS="${FUZZERS:-$ALL_FUZZERS}"
NICE="${FUZZ_NICE:-10}"
LIMITS=(-timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048)
# Leaks are findings (detect_leaks is on by default with ASan on Linux); UBSan stops at the first report.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0:handle_abort=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

build() {
  if [[ ! -f "$BUILD/CMakeCache.txt" ]]; then
    CC="${CC:-clang}" CXX="${CXX:-clang++}" cmake -S "$ROOT" -B "$BUILD" -DLMINV_FUZZ=ON \
      -DCMAKE_BUILD_TYPE=RelWithDebInfo
  fi
  cmake --build "$BUILD" -j"${FUZZ_JOBS:-2}" --target fuzzers
}

binary() {
  local bin="$BUILD/bin/$1_fuzz"
  [[ -x "$bin" ]] || { echo "fuzz.sh: $bin is missing: run bash scripts/fuzz.sh build first" >&2; exit 1; }
  echo "$bin"
}

# The findings libFuzzer left in DIR (crash-*, leak-*, timeout-*, oom-*, slow-unit-* do not count).
findings_in() { find "$1" -maxdepth 1 -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' \
  -o -name 'oom-*' \) 2>/dev/null | wc -l || true; }

# run FUZZER CORPUS LOG ARGS...: one libFuzzer run; returns its exit status.
run_one() {
  local name="$1" corpus="$2" log="$3"
  shift 3
  local bin
  bin="$(binary "$name")"
  local found="$BUILD/findings/$name"
  mkdir -p "$found"
  local status=0
  nice -n "$NICE" "$bin" "${LIMITS[@]}" -dict="$ROOT/fuzz/dict/$name.dict" -artifact_prefix="$found/" \
    -print_final_stats=1 "$@" "$corpus" >"$log" 2>&1 || status=$?
  return "$status"
}

# The figures of a finished run from its log: executions, seconds, exec/s, coverage, corpus size.
stats_of() {
  local log="$1"
  local runs secs eps cov corp
  runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | awk '{print $2}' | tail -1 || true)"
  secs="$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | awk '{print $5}' | tail -1 || true)"
  eps="$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | awk '{print $2}' | tail -1 || true)"
  if [[ -z "$eps" || "$eps" == 0 ]]; then  # libFuzzer says 0 for a run under a second: its last status line instead
    eps="$(grep -o 'exec/s: [0-9]*' "$log" | awk '{print $2}' | tail -1 || true)"
  fi
  cov="$(grep -o 'cov: [0-9]*' "$log" | awk '{print $2}' | tail -1 || true)"
  corp="$(grep -o 'corp: [0-9]*' "$log" | awk '{print $2}' | tail -1 || true)"
  echo "${runs:--} ${secs:--} ${eps:--} ${cov:--} ${corp:--}"
}

# smoke_one FUZZER SECONDS: one smoke run in $scratch; writes $scratch/FUZZER.result (the table's row).
smoke_one() {
  local name="$1" seconds="$2"
  mkdir -p "$scratch/$name"
  cp -r "$ROOT/fuzz/corpus/$name/." "$scratch/$name/"
  local before status=0
  before="$(findings_in "$BUILD/findings/$name")"
  run_one "$name" "$scratch/$name" "$scratch/$name.log" -max_total_time="$seconds" || status=$?
  read -r runs secs eps cov corp < <(stats_of "$scratch/$name.log")
  local result=ok
  if [[ "$status" -ne 0 || "$(findings_in "$BUILD/findings/$name")" -gt "$before" ]]; then
    result="FINDING (exit $status)"
    cp "$scratch/$name.log" "$BUILD/findings/$name/smoke.log"
  fi
  printf '%-18s %10s %8s %8s %6s %6s  %s\n' "$name" "$runs" "$secs" "$eps" "$cov" "$corp" "$result" \
    >"$scratch/$name.result"
}

smoke() {
  local seconds="${1:?smoke SECONDS}"
  local parallel="${FUZZ_PARALLEL:-2}"  # fuzzers at a time: CI's runners have 2 cores
  scratch="$(mktemp -d "${TMPDIR:-/tmp}/lminv-fuzz-smoke.XXXXXX")"
  trap 'rm -rf "$scratch"' EXIT
  for name in $FUZZERS; do binary "$name" >/dev/null; done
  local running=0
  for name in $FUZZERS; do
    if ((running >= parallel)); then
      wait -n || true
      running=$((running - 1))
    fi
    smoke_one "$name" "$seconds" &
    running=$((running + 1))
  done
  wait || true
  local failed=()
  printf '%-18s %10s %8s %8s %6s %6s  %s\n' fuzzer executions seconds exec/s cov corpus result
  for name in $FUZZERS; do
    if [[ ! -f "$scratch/$name.result" ]]; then
      echo "$name: no result (the harness did not run)"
      failed+=("$name")
      continue
    fi
    cat "$scratch/$name.result"
    if grep -q FINDING "$scratch/$name.result"; then
      failed+=("$name")
      grep -E 'ERROR|SUMMARY|runtime error|terminate|Test unit written' "$scratch/$name.log" | head -8 | sed 's/^/    /'
    fi
  done
  if ((${#failed[@]})); then
    echo "fuzz.sh smoke: findings in ${failed[*]} (logs and inputs in $BUILD/findings/)" >&2
    exit 1
  fi
  echo "fuzz.sh smoke: no findings"
}

long() {
  local runs="${1:?long RUNS}"
  local table="$BUILD/long/results.md"
  mkdir -p "$BUILD/long"
  [[ -f "$table" ]] ||
    printf '| fuzzer | executions | seconds | exec/s | corpus | cov | findings |\n|---|---|---|---|---|---|---|\n' >"$table"
  printf '%-18s %12s %8s %8s %7s %6s %9s\n' fuzzer executions seconds exec/s corpus cov findings
  local any=0
  for name in $FUZZERS; do
    local corpus="$BUILD/long/$name/corpus"
    if [[ ! -d "$corpus" ]]; then
      mkdir -p "$corpus"
      cp -r "$ROOT/fuzz/corpus/$name/." "$corpus/"
    fi
    local log="$BUILD/long/$name/$(date -u +%Y%m%dT%H%M%SZ).log"
    local before status=0
    before="$(findings_in "$BUILD/findings/$name")"
    run_one "$name" "$corpus" "$log" -runs="$runs" -max_total_time="${FUZZ_MAX_TIME:-3600}" || status=$?
    read -r n secs eps cov corp < <(stats_of "$log")
    local new=$(($(findings_in "$BUILD/findings/$name") - before))
    # 72: libFuzzer's exit status when it is interrupted (SIGINT), which is not a finding.
    ((status == 0 || status == 72)) || ((new > 0)) || new=1
    ((new == 0)) || any=1
    printf '%-18s %12s %8s %8s %7s %6s %9s\n' "$name" "$n" "$secs" "$eps" "$corp" "$cov" "$new"
    printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$name" "$n" "$secs" "$eps" "$corp" "$cov" "$new" >>"$table"
  done
  echo "fuzz.sh long: logs in $BUILD/long/<fuzzer>/, table appended to $table"
  return "$any"
}

case "${1:-}" in
  build) build ;;
  smoke) shift; smoke "$@" ;;
  long) shift; long "$@" ;;
  list) echo $ALL_FUZZERS ;;
  *) usage ;;
esac
