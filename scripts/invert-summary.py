#!/usr/bin/env python3
"""One table for lminv invert records (scripts/run-invert.sh): per records file, the prompts, how many were recovered
exactly (where the states name their prompt), the prompt verdicts, positions under a relaxed epsilon, the accepted
distance and the nearest rival's ratio (median and worst over positions), and the search time per prompt."""
import json
import statistics
import sys
from pathlib import Path


def main(files):
    print("| states | prompts | exact | unique | ambiguous | not found | relaxed positions | accepted distance "
          "(median / max) | rival ratio (median / min) | time/prompt mean (max) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for f in files:
        records = [json.loads(line) for line in open(f) if line.strip()]
        if not records:
            continue
        verdicts = [r["verdict"] for r in records]
        exact = [r["exact_match"] for r in records if r.get("exact_match") is not None]
        dist, ratio, relaxed, positions = [], [], 0, 0
        for r in records:
            for p in r["certificate"]["positions"]:
                if p["verdict"] == "known":
                    continue
                positions += 1
                dist.append(p["distance"])
                ratio.append(float("inf") if p["margin_ratio"] is None else p["margin_ratio"])
                relaxed += 1 if p["relaxed"] else 0
        times = [r["time_s"]["optimize"] for r in records]
        print(f"| {Path(f).stem} | {len(records)} | {sum(exact)}/{len(exact)} | {verdicts.count('unique')} | "
              f"{verdicts.count('ambiguous')} | {verdicts.count('not found')} | {relaxed}/{positions} | "
              f"{statistics.median(dist):.2e} / {max(dist):.2e} | {statistics.median(ratio):.3g} / {min(ratio):.3g} | "
              f"{statistics.mean(times):.2f} s ({max(times):.2f} s) |")


if __name__ == "__main__":
    main(sys.argv[1:])
