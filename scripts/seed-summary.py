#!/usr/bin/env python3
"""The seed study as lminv measured it: one Markdown row per experiment under runs/seed/ (scripts/run-seed.sh).

For each config, the newest record of each seed; a figure over several seeds is their mean with the range [min, max]
(the study speaks of outcomes "for different initializations"), a yes/no is counted (k/n). Columns:
  decoded          the decoded text of the lowest seed (pinv argmax, or the decoder's top-1)
  exact, tokens    exact recoveries (k/n) and the mean share of positions right
  below m          runs whose output L1 is below the control m (the study's inequality 4)
  next token       runs whose recovered prompt has the prompt's next token, and the model it came from
  steps to m       the first step some start's loss was below m (with metric L1: iterations until inequality 4)
  r (L1)           input L1 / output L1 of the result (the study's ratios are L1 / L1)
  walk             orthogonal walk: max |g.v| and d_o / d_i = output L1 / input L1; clamped walk: r (L1) against the
                   control's
Usage: python3 scripts/seed-summary.py [RUNS_DIR]   (default runs/seed)
"""
import glob
import json
import os
import statistics
import sys

root = sys.argv[1] if len(sys.argv) > 1 else "runs/seed"


def g(x):
    return "-" if x is None else f"{x:.3g}"


def spread(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return g(xs[0])
    return f"{g(statistics.mean(xs))} [{g(min(xs))}, {g(max(xs))}]"


def count(flags):
    flags = [f for f in flags if f is not None]
    return "-" if not flags else f"{sum(1 for f in flags if f)}/{len(flags)}"


rows = []
paths = sorted(glob.glob(os.path.join(root, "*", "records.jsonl")) +
               glob.glob(os.path.join(root, "*", "*", "records.jsonl")))
for path in paths:
    by_seed = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                by_seed[r["weights"]["seed"]] = r  # the newest of each seed
    if not by_seed:
        continue
    runs = [by_seed[s] for s in sorted(by_seed)]
    first = runs[0]
    values = [r.get("values", {}) for r in runs]
    walk = "-"
    if "gradient_dot_max" in values[0]:
        walk = (f"max abs(g.v) {spread([v.get('gradient_dot_max') for v in values])}; "
                f"d_o/d_i {spread([v.get('output_per_input_l1') for v in values])}")
    elif "control_ratio" in values[0]:
        walk = (f"r {spread([v.get('ratio_l1') for v in values])} vs control "
                f"{spread([v.get('control_ratio_l1') for v in values])}")
    nt = [r.get("next_token") for r in runs]
    next_token = count([n["agree"] if n else None for n in nt])
    if nt[0]:
        next_token += f" ({nt[0].get('model', 'full')})"
    rows.append([
        os.path.relpath(os.path.dirname(path), root),
        str(len(runs)),
        json.dumps(first["decoded"]["text"], ensure_ascii=False),
        count([r["exact_match"] for r in runs]),
        f"{100 * statistics.mean(r['token_accuracy'] for r in runs):.0f}%",
        spread([r["output_distance"]["l1"] for r in runs]),
        spread([r["control"]["l1"] for r in runs]),
        count([r.get("inequality_4") for r in runs]),
        spread([r.get("steps_to_control") for r in runs]) + (
            "" if all(r.get("steps_to_control") is not None for r in runs) else
            f" ({sum(1 for r in runs if r.get('steps_to_control') is None)} never)"),
        spread([r.get("input_distance_l1") for r in runs]),
        spread([r.get("ratio_input_output_l1") for r in runs]),
        next_token,
        walk,
        f"{first['steps']} / {statistics.mean(r['time_s']['total'] for r in runs):.0f} s",
    ])

head = ["config", "seeds", "decoded (lowest seed)", "exact", "tokens", "output L1", "control m L1", "below m", "steps to m",
        "input L1", "r (L1)", "next token agrees", "walk", "steps / time per run"]
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
for row in rows:
    print("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
