#!/usr/bin/env bash
# Builds lminv with sanitizers and runs the tests that suit them (docs/reliability.md, "Sanitizers": what is in,
# what is out and why, and how long it takes):
#   bash scripts/sanitize.sh asan   ASan + UBSan (LMINV_SANITIZE=address,undefined) in build-asan/
#   bash scripts/sanitize.sh tsan   TSan (LMINV_SANITIZE=thread) in build-tsan/, OpenMP through LLVM's libomp and its
#                                   Archer tool where installed (libomp-dev), else OpenMP code on one thread
# Extra arguments go to ctest (e.g. --repeat until-fail:3). Only the chosen tests' targets are built. Environment:
#   LMINV_SANITIZE_DIR   the build folder (default build-asan / build-tsan in the source tree)
#   LMINV_SANITIZE_JOBS  build and ctest parallelism (default: the number of cores)
#   LMINV_SANITIZE_ALL   1: every test program built here (minus the exclusions that are not about time), not the CI
#                        subset
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
mode=${1:-}
case "$mode" in asan | tsan) shift ;; *) echo "usage: $0 asan|tsan [ctest arguments]" >&2; exit 2 ;; esac
jobs=${LMINV_SANITIZE_JOBS:-$(nproc)}

# ---- what each mode builds and runs ---------------------------------------------------------------------------
# Test programs (ctest runs their test cases; WHOLE programs are one ctest test each), and the tests to leave out
# (a ctest -E regex), each with its reason in docs/reliability.md.
if [[ $mode == asan ]]; then
  sanitize=address,undefined
  dir=${LMINV_SANITIZE_DIR:-$root/build-asan}
  # The parsers and file formats, the SDK's Tensor, the registry (dlopen of instrumented plugins, refused plugins),
  # the nearest decoder and skinny kernels, and the lminv program end to end (cli, reliability: host + reference,
  # descent, pinv, nearest, sequential, brute-force, pez, clamped-walk plugins).
  programs=(tensor_test safetensors_test checkpoint_test config_test prompts_test states_test families_test
    tokenizer_test registry_test nearest_test skinny_matmul_vec32_test skinny_matmul_vec64_test cli_test
    reliability_test report_test progress_test)
  # LMINV_SANITIZE_ALL=1 adds the numerical suites, and those that load every backend (torch and onednn: their
  # instrumented builds alone take longer than CI's budget for this job).
  all_programs=("${programs[@]}" weights_test reference_mlp_test reference_gpt2_test reference_decoder_test
    gpt2_golden_test pinv_test descent_test walks_test pez_test invert_test hf_tokenizer_test roofline_test
    sequential_test prefix_cache_test conformance_test torch_backend_test onednn_backend_test)
  # The three longest runs of the lminv program (the quickstart took 688 s under ASan, the others several times any
  # other cli test): the host code they reach is reached by the cli and reliability tests kept.
  exclude='^Cli[.](QuickstartRecoversThePromptExactly|InterruptedSweep.*|EveryFamilyRunsInitsAndSweeps)$'
  extra_targets=()
else
  sanitize=thread
  dir=${LMINV_SANITIZE_DIR:-$root/build-tsan}
  # The code with threads of its own: std::thread (SafetensorsFile::read_many, the roofline probes, the tokenizers
  # shared between threads) and OpenMP (skinny kernels, the nearest decoder and the pinv projection it reuses,
  # reference kernels, weights init). pinv_test only with LMINV_SANITIZE_ALL=1: one 80 s case, and its projection
  # kernel already runs in nearest_test.
  programs=(skinny_matmul_vec32_test skinny_matmul_vec64_test safetensors_test nearest_test tokenizer_test
    roofline_test weights_test reference_mlp_test)
  all_programs=("${programs[@]}" pinv_test)
  exclude=''
  extra_targets=()
fi
[[ ${LMINV_SANITIZE_ALL:-0} == 1 ]] && programs=("${all_programs[@]}")

# ---- configure and build -------------------------------------------------------------------------------------
# -O1 -g: readable stacks at a fraction of -O2's compile time; assertions stay on (no NDEBUG). Ninja where it is
# installed (a new folder only): CMake's Makefiles build the targets named on the command line one after another.
generator=()
[[ ! -f $dir/CMakeCache.txt ]] && command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S "$root" -B "$dir" ${generator[@]+"${generator[@]}"} -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" -DLMINV_SANITIZE="$sanitize" >/dev/null
build_start=$SECONDS
targets=("${programs[@]}" ${extra_targets[@]+"${extra_targets[@]}"})
if [[ -f $dir/build.ninja ]]; then
  cmake --build "$dir" -j "$jobs" --target "${targets[@]}"
else
  # The top-level Makefile is .NOTPARALLEL. Its Makefile2 holds the whole graph: asking it for each test program's
  # <dir>/all goal (not the goal named after the target, a recursive make each, which race on shared dependencies)
  # builds them and their dependencies together, each once.
  goals=()
  for t in "${targets[@]}"; do goals+=("tests/CMakeFiles/$t.dir/all"); done  # every chosen program is in tests/
  cmake --build "$dir" --target cmake_check_build_system
  make -C "$dir" -s -j "$jobs" -f CMakeFiles/Makefile2 "${goals[@]}"
fi
echo "sanitize.sh: $mode build took $((SECONDS - build_start)) s"

# ---- runtime options -----------------------------------------------------------------------------------------
if [[ $mode == asan ]]; then
  # detect_leaks: LeakSanitizer at exit; halt_on_error: the first report fails the test; stack-use-after-return and
  # initialization order are off by default in GCC's ASan. No suppressions: every report so far was lminv's own.
  asan=detect_leaks=1:halt_on_error=1:abort_on_error=0:print_stacktrace=1:strict_string_checks=1
  asan+=:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1
  export ASAN_OPTIONS="$asan${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
  export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:report_error_type=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
else
  export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:history_size=4${TSAN_OPTIONS:+:$TSAN_OPTIONS}"
  # GCC's libgomp synchronises its threads with futexes TSan cannot see, so every barrier reads as a race. LLVM's
  # libomp implements libgomp's ABI (GOMP_*) and, with its Archer tool, tells TSan about barriers, task waits and
  # the team's start and end: GCC-built OpenMP code is then checked for real races. Without it, OpenMP code runs on
  # one thread (its std::thread code is still checked).
  archer=$(ls /usr/lib/llvm-*/lib/libarcher.so 2>/dev/null | sort -V | tail -n 1 || true)
  libomp=${archer%/libarcher.so}/libomp.so.5
  if [[ -n $archer && -f $libomp ]]; then
    mkdir -p "$dir/openmp-archer"
    ln -sf "$libomp" "$dir/openmp-archer/libgomp.so.1"
    export LD_LIBRARY_PATH="$dir/openmp-archer${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export OMP_TOOL_LIBRARIES="$archer"
    # libomp's own (uninstrumented) code would otherwise show its internal synchronisation as races.
    export TSAN_OPTIONS="$TSAN_OPTIONS:ignore_noninstrumented_modules=1"
    echo "sanitize.sh: OpenMP through $libomp with Archer ($archer)"
  else
    export OMP_NUM_THREADS=1
    echo "sanitize.sh: no LLVM libomp with Archer (Debian: libomp-dev): OpenMP code runs on one thread"
  fi
fi

# ---- run: the chosen programs' tests, by number -------------------------------------------------------------------
# ctest -N -V names each test's command; the tests of the programs above are picked by the command's file name.
wanted=" ${programs[*]} "
numbers=$(ctest --test-dir "$dir" -N -V | awk -v wanted="$wanted" -v exclude="$exclude" '
  /^[0-9]+: Test command: / { n = $1; sub(":", "", n); prog = $4; sub(".*/", "", prog); next }
  /^ *Test +#[0-9]+: / {
    name = $3
    if (index(wanted, " " prog " ") && (exclude == "" || name !~ exclude)) printf "%s,", n
  }')
[[ -n $numbers ]] || { echo "sanitize.sh: no tests selected" >&2; exit 1; }
count=$(tr -cd ',' <<<"$numbers" | wc -c)
echo "sanitize.sh: $mode: $count tests of ${programs[*]} (left out: ${exclude:-none})"
run_start=$SECONDS
status=0
ctest --test-dir "$dir" --output-on-failure -j "$jobs" -I "0,0,0,${numbers%,}" "$@" || status=$?
echo "sanitize.sh: $mode tests took $((SECONDS - run_start)) s"
exit $status
