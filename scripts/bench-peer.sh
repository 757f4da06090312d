#!/usr/bin/env bash
# lminv bench and the plain PyTorch peer (bench/peer_pytorch.py) on the same cells, then the inversion loop of an
# `lminv run` against the same loop in PyTorch (bench/peer_loop.py), printed side by side (bench/side_by_side.py).
#
#   bash scripts/bench-peer.sh [script options] [lminv bench options]
#   bash scripts/bench-peer.sh --backends torch,onednn --dtypes f32 --models 12blocks-lmhead --batches 1,32 \
#     --cache-batches ''
#
# Every lminv bench option is passed to lminv bench; those the peer shares (--dtypes --models --batches --tokens
# --repeat --n-layer) go to the peer as well. Script options:
#   --lminv PATH        the lminv binary (default: build/bin/lminv)
#   --python PATH       the Python with torch (default: /usr/bin/python3, Debian's python3-torch)
#   --work DIR          where the JSON Lines files and logs go (default: a new folder under /tmp)
#   --peer-threads N    the peer's torch.set_num_threads (default "default": torch's own start-up setting, what a
#                       PyTorch user runs with; N = 0: all cores)
#   --peer-blas-threads N  set OpenBLAS's threads in the peer too (default 0: as the library starts)
#   --loop-config FILE  the run whose loop is compared (default: configs/gpt2-12blocks-lmhead.ini)
#   --loop-steps N      its steps (default: the config's)
#   --no-loop           the step cells only
# The loop runs once per backend and dtype of the lists given (lminv bench's defaults when not given), without
# snapshots (output.snapshot_steps empty), and the peer once per dtype, from that run's record.
set -euo pipefail
cd "$(dirname "$0")/.."

lminv=build/bin/lminv
python=/usr/bin/python3
work=""
peer_threads=default
peer_blas_threads=0
loop_config=configs/gpt2-12blocks-lmhead.ini
loop_steps=""
loop=1
backends="reference,torch,onednn"  # lminv bench's defaults
dtypes="f32,f64"
bench_args=()
peer_args=()

die() { echo "bench-peer.sh: $*" >&2; exit 2; }
while (($#)); do
  opt=$1
  if [[ $opt == --*=* ]]; then  # --opt=value
    value=${opt#*=}
    opt=${opt%%=*}
    set -- "$opt" "$value" "${@:2}"
  fi
  case $opt in
    --lminv | --python | --work | --peer-threads | --peer-blas-threads | --loop-config | --loop-steps)
      (($# >= 2)) || die "$opt needs a value"
      case $opt in
        --lminv) lminv=$2 ;;
        --python) python=$2 ;;
        --work) work=$2 ;;
        --peer-threads) peer_threads=$2 ;;
        --peer-blas-threads) peer_blas_threads=$2 ;;
        --loop-config) loop_config=$2 ;;
        --loop-steps) loop_steps=$2 ;;
      esac
      shift 2 ;;
    --no-loop) loop=0; shift ;;
    --out) die "--out: the script chooses the files (see --work)" ;;
    -h | --help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --dtypes | --models | --batches | --tokens | --repeat | --n-layer)
      (($# >= 2)) || die "$opt needs a value"
      [[ $opt == --dtypes ]] && dtypes=$2
      bench_args+=("$1" "$2"); peer_args+=("$1" "$2"); shift 2 ;;
    --backends | --cache-batches | --cache-prefix | --plugin-dir)
      (($# >= 2)) || die "$opt needs a value"
      [[ $opt == --backends ]] && backends=$2
      bench_args+=("$1" "$2"); shift 2 ;;
    *) die "unknown option '$1' (lminv bench's options, or see --help)" ;;
  esac
done
[[ -x $lminv ]] || die "no lminv binary at '$lminv' (build it, or give --lminv PATH)"
[[ -x $python ]] || die "no Python at '$python' (--python PATH)"
"$python" -c "import torch" 2>/dev/null || die "'$python' cannot import torch (apt-get install python3-torch)"
[[ -z $loop_steps || $loop_steps =~ ^[1-9][0-9]*$ ]] || die "--loop-steps '$loop_steps' is not a positive integer"
[[ $loop == 0 || -f $loop_config ]] || die "no config '$loop_config'"
if [[ -z $work ]]; then work=$(mktemp -d /tmp/bench-peer.XXXXXX); fi
mkdir -p "$work"
rm -f "$work/lminv-bench.jsonl" "$work/peer-bench.jsonl" "$work/peer-loop.jsonl"
echo "bench-peer.sh: files in $work; load average $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"

# lminv's refusal warnings for plugins of other builds are not this script's business.
quiet() { grep --line-buffered -v "^lminv: warning: refused plugin" || true; }

echo "== lminv bench ${bench_args[*]}"
"$lminv" bench "${bench_args[@]}" --out "$work/lminv-bench.jsonl" 2>&1 | tee "$work/lminv-bench.log" | quiet
peer_threads_args=(--threads "$peer_threads" --blas-threads "$peer_blas_threads")
echo "== peer_pytorch ${peer_args[*]} ${peer_threads_args[*]}"
"$python" -B bench/peer_pytorch.py "${peer_args[@]}" "${peer_threads_args[@]}" --out "$work/peer-bench.jsonl" \
  2>&1 | tee "$work/peer-bench.log"

loop_records=()
if ((loop)); then
  IFS=, read -r -a loop_backends <<<"$backends"
  IFS=, read -r -a loop_dtypes <<<"$dtypes"
  steps_set=()
  [[ -n $loop_steps ]] && steps_set=(--set "optimizer.steps=$loop_steps")
  for dtype in "${loop_dtypes[@]}"; do
    [[ -n $dtype ]] || continue
    first=""
    for backend in "${loop_backends[@]}"; do
      [[ -n $backend ]] || continue
      dir="$work/loop-$backend-$dtype"
      rm -rf "$dir"
      echo "== lminv run $loop_config (backend $backend, $dtype)"
      if "$lminv" run "$loop_config" --set "backend.name=$backend" --set "backend.dtype=$dtype" \
        ${steps_set[@]+"${steps_set[@]}"} --set "output.dir=$dir" --set output.snapshot_steps= \
        --set output.progress=off >"$dir.log" 2>&1; then
        grep -E "^  (plugins|time) " "$dir.log" || true
        loop_records+=("$dir/records.jsonl")
        [[ -n $first ]] || first="$dir/records.jsonl"
      else
        echo "   failed (kept going; see $dir.log):"; tail -n 3 "$dir.log" | sed 's/^/   /'
      fi
    done
    if [[ -n $first ]]; then
      echo "== peer_loop ($dtype, from $first)"
      "$python" -B bench/peer_loop.py --record "$first" "${peer_threads_args[@]}" --out "$work/peer-loop.jsonl"
    fi
  done
  [[ -f $work/peer-loop.jsonl ]] && loop_records+=("$work/peer-loop.jsonl")
fi

echo
echo "== side by side (noisy when the machine is shared: load average $(cut -d' ' -f1-3 /proc/loadavg))"
"$python" -B bench/side_by_side.py "$work/lminv-bench.jsonl" "$work/peer-bench.jsonl" \
  ${loop_records[@]+"${loop_records[@]}"} |
  tee "$work/side-by-side.txt"
