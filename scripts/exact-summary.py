#!/usr/bin/env python3
"""Summarises exact-inversion sweep records (lminv sweep's JSON Lines) as Markdown tables for bench/RESULTS.md.

    python3 scripts/exact-summary.py runs/exact/gpt2-small-block12/sweep.jsonl runs/exact/brute-force/*.jsonl ...

Per grid point of each file: runs, exact matches, token accuracy, inversion time per prompt (mean / median / max),
candidates verified per position, and for the sequential search the certificate (smallest margin, largest accepted
distance) and where the policy ranked the prompt's token.
"""
import json
import statistics
import sys


def fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def main(files):
    print("| records | optimizer | blocks | runs | exact | token acc. | time/prompt mean | median | max "
          "| candidates/position | min margin | max accepted distance | true token ranked first |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for path in files:
        groups = {}
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                key = (r["optimizer"], r["model"]["blocks"], r.get("config", {}).get("optimizer", {}).get("policy", ""))
                groups.setdefault(key, []).append(r)
        for (optimizer, blocks, policy), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
            times = [r["time_s"]["optimize"] for r in rs]
            exact = sum(r["exact_match"] for r in rs)
            acc = statistics.mean(r["token_accuracy"] for r in rs)
            per_pos = [r["values"].get("candidates_per_position") for r in rs]
            per_pos = statistics.mean(per_pos) if None not in per_pos else None
            series = [r.get("series", {}) for r in rs]
            margins = [m for s in series for m in s.get("margin", []) if m is not None]
            dists = [d for s in series for d in s.get("distance", []) if d is not None]
            ranks = [x for s in series for x in s.get("true_rank", []) if x is not None and x >= 0]
            first = f"{100 * sum(1 for x in ranks if x == 0) / len(ranks):.1f}% (max rank {int(max(ranks))})" \
                if ranks and optimizer == "sequential" else "-"
            name = optimizer + (f" ({policy})" if policy else "")
            print(f"| {path} | {name} | {blocks} | {len(rs)} | {exact}/{len(rs)} | {100 * acc:.1f}% "
                  f"| {fmt(statistics.mean(times))} s | {fmt(statistics.median(times))} s | {fmt(max(times))} s "
                  f"| {fmt(per_pos, 1)} | {fmt(min(margins) if margins else None, 3)} "
                  f"| {('%.1e' % max(dists)) if dists else '-'} | {first} |")


if __name__ == "__main__":
    main(sys.argv[1:])
