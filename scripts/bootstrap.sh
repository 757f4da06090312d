#!/usr/bin/env bash
# Sets up what is missing on a Debian 12 machine, builds lminv (Release, in build/), then:
#   bash scripts/bootstrap.sh run    runs the quickstart experiment (configs/quickstart.ini)
#   bash scripts/bootstrap.sh test   runs every test (ctest), then the sanitizer job (ASan + UBSan and TSan builds,
#                                    scripts/sanitize.sh) and the short fuzz runs (scripts/fuzz.sh smoke) as CI does
#   bash scripts/bootstrap.sh build  only sets up and builds
#   bash scripts/bootstrap.sh bench  also installs what the benchmarks' peers need (Debian's python3-torch for
#                                    bench/peer_pytorch.py; the product never uses it), then runs scripts/bench-peer.sh
# Safe to run again: each step does only what is not done yet.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
action=${1:-build}
case "$action" in run | test | build | bench) ;; *) echo "usage: $0 run|test|build|bench" >&2; exit 2 ;; esac

# --- Debian packages ----------------------------------------------------------------------------
packages=(cmake g++ make ccache npm libboost-dev libboost-program-options-dev libgtest-dev libeigen3-dev
  nlohmann-json3-dev libopenblas0-pthread ocl-icd-opencl-dev libdnnl-dev libtorch-dev libpcre2-dev libutf8proc-dev
  libzip-dev
  libopenmpi-dev openmpi-bin  # mpirun -n N lminv sweep (docs/scale-out.md); lminv builds without them, as one process
  fortunes wordnet-base)  # text for lminv train's corpus (docs/training.md)
# The benchmarks only: the plain PyTorch peer (bench/peer_pytorch.py, Debian's Python LibTorch 1.13).
[[ $action == bench ]] && packages+=(python3-torch python3-numpy)
# The tests only: Clang with its sanitizer runtimes for the libFuzzer harnesses, LLVM's libomp with its Archer tool
# for TSan over OpenMP code, Ninja for the sanitizer builds (docs/reliability.md).
# Also Debian's Chromium, in which the report test renders a page headless (docs/reports.md).
[[ $action == test ]] && packages+=(clang libclang-rt-dev libomp-dev ninja-build chromium)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# npm may come from elsewhere than Debian (nodesource, nvm): then it is not missing.
if command -v npm >/dev/null; then
  kept=()
  for p in ${missing[@]+"${missing[@]}"}; do [[ $p == npm ]] || kept+=("$p"); done
  missing=(${kept[@]+"${kept[@]}"})
fi
if ((${#missing[@]})); then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo=sudo
  echo "bootstrap: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# --- GPT-2 tokenizer tables (the embedded default) -----------------------------------------------
bash scripts/fetch-tokenizer.sh
# --- Hugging Face tokenizer.json files (Llama 2, Llama 3, Qwen3) and the JavaScript engine the tests compare with --
bash scripts/fetch-hf-tokenizers.sh
# --- Vega, Vega-Lite and vega-embed, inlined into the pages of lminv report ------------------------------------------
bash scripts/fetch-vega.sh

# --- build ----------------------------------------------------------------------------------------
jobs=$(nproc)
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$jobs"

case "$action" in
  run) ./build/bin/lminv run configs/quickstart.ini ;;
  test)
    ctest --test-dir build --output-on-failure -j "$jobs"
    # The sanitizer job and the short fuzz runs (docs/reliability.md: which tests, why, and how long).
    bash scripts/sanitize.sh asan
    bash scripts/sanitize.sh tsan
    bash scripts/fuzz.sh build
    bash scripts/fuzz.sh smoke "${LMINV_FUZZ_SMOKE_SECONDS:-20}"
    ;;
  build) ;;
  bench) bash scripts/bench-peer.sh ;;
esac
