#!/usr/bin/env bash
# The measured table of docs/scale-out.md: the same exact-inversion sweep (untrained GPT-2 small, block 12, the first
# 20 prompts of tests/data/prompts-20.txt) as one process and as `mpirun -n 2`, 1 thread per process, and one process
# with 2 threads for comparison; wall time and peak memory of each, and whether the MPI records equal one process's.
#   bash scripts/run-scale-out.sh [PROMPTS]     PROMPTS: how many prompts (default 20)
# Output in runs/scale-out/PROMPTS-prompts/ (made afresh: nothing is resumed), the table on stdout.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
count=${1:-20}
lminv=build/bin/lminv
out=runs/scale-out/$count-prompts
config=configs/exact/gpt2-small-block12.ini
prompts=tests/data/prompts-20.txt
mpi=(mpirun --oversubscribe)
[[ $(id -u) -eq 0 ]] && mpi+=(--allow-run-as-root)
rm -rf "$out"
mkdir -p "$out"

# NAME THREADS COMMAND...: runs the sweep into $out/NAME/, timed by GNU time (wall, peak resident memory per process).
measure() {
  local name=$1 threads=$2
  shift 2
  echo "== $name: $*" >&2
  /usr/bin/time -f "%e %M" -o "$out/$name.time" "$@" sweep "$config" --prompts "$prompts" --limit "$count" \
    --set backend.threads="$threads" --set output.report=false --records "$out/$name/sweep.jsonl" > "$out/$name.log"
  tail -4 "$out/$name.log" >&2
}
measure one-process-1-thread 1 "$lminv"
measure mpirun-2-ranks-1-thread 1 "${mpi[@]}" -n 2 "$lminv"
measure one-process-2-threads 2 "$lminv"

/usr/bin/python3 - "$out" "$count" <<'EOF'
import json, os, sys
out, count = sys.argv[1], int(sys.argv[2])
def records(name):
    with open(os.path.join(out, name, "sweep.jsonl")) as f:
        return {r["sweep"]["key"]: r for r in map(json.loads, f)}
def found(r):  # what a run found: the ids, the exact match, the verdict of the prompt and of each position
    c = r.get("certificate") or {}
    return (r["decoded"]["ids"], r["exact_match"], c.get("verdict"),
            [(p["id"], p["verdict"]) for p in c.get("positions", [])])
def distance_gap(a, b):  # the largest difference of an accepted token's distance between two records of a run
    return max(abs(p["distance"] - q["distance"])
               for p, q in zip(a["certificate"]["positions"], b["certificate"]["positions"]))
one = records("one-process-1-thread")
print("| run | processes x threads | wall (s) | speed-up | runs | exact | certified unique | inversion s/prompt (mean) "
      "| Jacobians (cached) | ids and verdicts as one process's | largest distance difference | peak memory per "
      "process (GB) |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
base = None
for name, shape in [("one-process-1-thread", "1 x 1"), ("mpirun-2-ranks-1-thread", "2 x 1"),
                    ("one-process-2-threads", "1 x 2")]:
    wall, rss_kb = open(os.path.join(out, name + ".time")).read().split()[-2:]
    wall = float(wall)
    base = base or wall
    rs = records(name)
    exact = sum(r["exact_match"] for r in rs.values())
    unique = sum((r.get("certificate") or {}).get("verdict") == "unique" for r in rs.values())
    mean = sum(r["time_s"]["optimize"] for r in rs.values()) / len(rs)
    if name == "one-process-2-threads":
        # The threads setting is part of the run key: compared by prompt index instead.
        by_index = {x["sweep"]["prompt_index"]: x for x in one.values()}
        pairs = [(r, by_index[r["sweep"]["prompt_index"]]) for r in rs.values()]
    else:
        pairs = [(rs[k], one[k]) for k in one if k in rs] if rs.keys() == one.keys() else []
    equal = "yes" if pairs and all(found(a) == found(b) for a, b in pairs) else "NO"
    gap = max(distance_gap(a, b) for a, b in pairs) if pairs else float("nan")
    jac = sum(r["values"]["jacobians"] for r in rs.values())
    cached = sum(r["values"].get("jacobians_cached", 0) for r in rs.values())
    print(f"| {name} | {shape} | {wall:.1f} | {base / wall:.2f}x | {len(rs)} | {exact}/{len(rs)} | {unique}/{len(rs)} "
          f"| {mean:.2f} | {jac:.0f} ({cached:.0f}) | {equal} | {gap:.1e} | {int(rss_kb) / 1e6:.2f} |")
EOF
