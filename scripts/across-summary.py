#!/usr/bin/env python3
"""Invertibility across training: one Markdown row per checkpoint from the records of `lminv sweep --checkpoints`
(scripts/run-across.sh). Columns, each from the records of one config at that checkpoint:
  step, tokens seen, validation loss    the checkpoint (the records' sweep.training)
  head: steps to (4), exact              descent with the LM head (gpt2-1block-lmhead-N2000): the first step its L1
                                         loss was below the control m ("never" within the run's steps), and whether
                                         the decoded prompt is the prompt
  no head: steps to (4), exact           the same without a head (gpt2-1block-nohead-N200)
  walk r (L1)                            the clamped walk (clamped-walk-gpt2-12blocks): r against its control's
  sequential: exact, candidates, time    the exact search at block 12: prompts recovered and certified unique, mean
                                         candidates verified per position, mean time per prompt (time_s.optimize)
Usage: python3 scripts/across-summary.py RECORDS.jsonl...
"""
import json
import os
import statistics
import sys


def g(x, digits=3):
    return "-" if x is None else f"{x:.{digits}g}"


rows = {}  # step -> {column: value}
for path in sys.argv[1:]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            t = (r.get("sweep") or {}).get("training")
            if not t:
                continue
            row = rows.setdefault(t["step"], {"tokens": t.get("tokens_seen"), "validation": t.get("validation_loss"),
                                               "exact_runs": []})
            name = os.path.basename(r["config_file"])
            if name.startswith("gpt2-1block-lmhead"):
                row["head"] = (r.get("steps_to_control"), r["exact_match"], r["steps"])
            elif name.startswith("gpt2-1block-nohead"):
                row["nohead"] = (r.get("steps_to_control"), r["exact_match"], r["steps"])
            elif name.startswith("clamped-walk"):
                row["walk"] = (r["values"].get("ratio_l1"), r["values"].get("control_ratio_l1"))
            elif r["optimizer"] == "sequential":
                row["exact_runs"].append(r)


def steps_cell(cell):
    if not cell:
        return "-", "-"
    steps, exact, total = cell
    return (str(steps) if steps is not None else f"never in {total}"), ("yes" if exact else "no")


print("| step | tokens seen | validation loss | head: steps to (4) | head: exact | no head: steps to (4) | "
      "no head: exact | walk r (L1) vs control | sequential: exact | candidates/position | time/prompt |")
print("|" + "---|" * 11)
for step in sorted(rows):
    row = rows[step]
    h_steps, h_exact = steps_cell(row.get("head"))
    n_steps, n_exact = steps_cell(row.get("nohead"))
    walk = row.get("walk")
    walk_cell = f"{g(walk[0])} vs {g(walk[1])}" if walk else "-"
    runs = row["exact_runs"]
    if runs:
        unique = sum(1 for r in runs if r["exact_match"] and (r.get("certificate") or {}).get("verdict") == "unique")
        cands = [p["candidates"] for r in runs for p in r["certificate"]["positions"]]
        seq = (f"{unique}/{len(runs)}", f"{statistics.mean(cands):.1f}",
               f"{statistics.mean(r['time_s']['optimize'] for r in runs):.2f} s")
    else:
        seq = ("-", "-", "-")
    tokens = f"{row['tokens']:,}" if row["tokens"] is not None else "-"
    print(f"| {step} | {tokens} | {g(row['validation'], 4)} | {h_steps} | {h_exact} | {n_steps} | {n_exact} | "
          f"{walk_cell} | {seq[0]} | {seq[1]} | {seq[2]} |")
