#!/usr/bin/env python3
"""Prints a Markdown table of the newest record of each experiment under runs/seed/ (see scripts/run-seed.sh)."""
import glob
import json
import os
import sys

root = sys.argv[1] if len(sys.argv) > 1 else "runs/seed"


def fmt(x):
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


rows = []
for path in sorted(glob.glob(os.path.join(root, "*", "records.jsonl"))):
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    if not lines:
        continue
    r = json.loads(lines[-1])
    v = r.get("values", {})
    nt = r.get("next_token")
    walk = ""
    if "gradient_dot_max" in v:
        walk = f"max abs(g.v) {fmt(v['gradient_dot_max'])}, d_o/d_i {fmt(v.get('output_per_input'))}"
    if "control_ratio" in v:
        walk = f"r {fmt(v.get('ratio'))} vs control r {fmt(v['control_ratio'])}"
    rows.append([
        os.path.basename(os.path.dirname(path)),
        json.dumps(r["decoded"]["text"], ensure_ascii=False),
        fmt(r["exact_match"]),
        f"{100 * r['token_accuracy']:.0f}%",
        fmt(r["output_distance"]["l1"]),
        fmt(r["control"]["l1"]),
        fmt(r.get("inequality_4")),
        fmt(r["input_distance_l2"]),
        fmt(r.get("ratio_input_output_l2")),
        "-" if nt is None else fmt(nt["agree"]),
        walk or "-",
        f"{r['steps']} / {r['time_s']['total']:.0f} s",
    ])

head = ["config", "decoded", "exact", "tokens", "output L1", "control m L1", "below m", "input L2", "r (L2/L2)",
        "next token agrees", "walk", "steps / time"]
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
for row in rows:
    print("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
