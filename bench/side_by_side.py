#!/usr/bin/python3
"""lminv's cells and the PyTorch peer's side by side, from their JSON Lines files.

    bench/side_by_side.py lminv-bench.jsonl peer-bench.jsonl [loop records ...]

Every file may hold any of these records, in any order (a later record of the same cell replaces an earlier one):
  kind "step"      a step cell of `lminv bench --out` (backend = an lminv backend) or of bench/peer_pytorch.py
                   (backend "pytorch"); read: backend, dtype, model, batch, tokens, seconds_per_step, flops_per_step
  kind "machine"   lminv bench's machine measurements: its numeric fields are printed as they come
  kind "loop"      bench/peer_loop.py's inversion loop: backend, dtype, model, steps, seconds, steps_per_s
  kind "peer_gemm" bench/peer_pytorch.py's torch.mm rate per dtype (flop_per_s): LibTorch's BLAS in that process
  no kind          an `lminv run` record (records.jsonl): backend, model.dtype, steps, time_s.optimize, steps_per_s
Other kinds (prefix_cache, ...) and keys are passed over, so new fields in lminv's records change nothing here.

Step table: one row per (dtype, model, batch, tokens), seconds per step of each lminv backend and of the peer, and
each backend's ratio lminv / peer (below 1: lminv is faster). Loop table: steps per second, seconds per step and the
same ratio.
"""

import json
import sys

PEER = "pytorch"


def read_records(paths):
    records = []
    for path in paths:
        try:
            with open(path) as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise SystemExit(f"side_by_side: {path}:{number}: not JSON ({e.msg})")
        except OSError as e:
            raise SystemExit(f"side_by_side: cannot read '{path}': {e.strerror}")
    return records


def fmt_seconds(s):
    return "-" if s is None else f"{s:.4f}"


def fmt_ratio(a, b):
    return "-" if a is None or b is None or b <= 0 else f"{a / b:.2f}"


def table(header, rows, left):
    """Columns of text; the first `left` left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = []
    for r in [header] + rows:
        cells = [str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def step_table(records):
    cells, backends, keys, bounds = {}, [], [], {}
    for r in records:
        if r.get("kind") != "step":
            continue
        if r.get("backend") != PEER and isinstance(r.get("bound_s"), (int, float)) and r["bound_s"] > 0:
            bounds[(r.get("dtype"), r.get("model"), r.get("batch"), r.get("tokens"))] = float(r["bound_s"])
        try:
            key = (r["dtype"], r["model"], int(r["batch"]), int(r["tokens"]))
            cell = (float(r["seconds_per_step"]), r.get("flops_per_step"))
            backend = r["backend"]
        except (KeyError, TypeError, ValueError) as e:
            raise SystemExit(f"side_by_side: a step record lacks {e}: {json.dumps(r)[:200]}")
        if backend != PEER and backend not in backends:
            backends.append(backend)
        if key not in keys:
            keys.append(key)
        cells[(backend, key)] = cell
    if not keys:
        return "no step records"
    header = ["dtype", "model", "B", "T"] + [f"{b} s" for b in backends] + [f"{PEER} s"] + \
             [f"{b}/{PEER}" for b in backends]
    if bounds:  # lminv bench's bound of the cell (its records since the roofline), when it gives one
        header += ["bound s", f"{PEER}/bound"]
    rows, notes = [], []
    for key in keys:
        peer = cells.get((PEER, key))
        own = [cells.get((b, key)) for b in backends]
        rows.append(list(key) + [fmt_seconds(c[0] if c else None) for c in own] +
                    [fmt_seconds(peer[0] if peer else None)] +
                    [fmt_ratio(c[0] if c else None, peer[0] if peer else None) for c in own])
        if bounds:
            bound = bounds.get(key)
            rows[-1] += [fmt_seconds(bound), fmt_ratio(peer[0] if peer else None, bound)]
        for b, c in zip(backends, own):  # the same work counted on both sides?
            if c and peer and c[1] and peer[1] and abs(c[1] - peer[1]) > 1e-9 * abs(peer[1]):
                notes.append(f"note: {key}: {b} counts {c[1]:.6g} FLOP per step, {PEER} {peer[1]:.6g}")
    return "\n".join([table(header, rows, 2)] + notes)


def loop_table(records):
    cells = {}  # (backend, dtype) -> (steps, seconds, model, source)
    for r in records:
        if r.get("kind") == "loop":
            cells[(r["backend"], r["dtype"])] = (int(r["steps"]), float(r["seconds"]), r.get("model", ""),
                                                 r.get("config", ""))
        elif "kind" not in r and "steps_per_s" in r and "time_s" in r:  # an lminv run record
            m = r.get("model", {})
            label = f"{m.get('family', '?')} blocks {m.get('blocks', '?')} head {m.get('head', '?')}"
            cells[(r["backend"], m.get("dtype", "?"))] = (int(r["steps"]), float(r["time_s"]["optimize"]), label,
                                                          r.get("config_file", ""))
    if not cells:
        return None
    dtypes = []
    for (_, d) in cells:
        if d not in dtypes:
            dtypes.append(d)
    rows = []
    for d in dtypes:
        peer = cells.get((PEER, d))
        peer_step = peer[1] / peer[0] if peer else None
        for (b, dd), (steps, seconds, model, source) in cells.items():
            if dd != d:
                continue
            per_step = seconds / steps
            rows.append([b, d, model, steps, f"{steps / seconds:.3f}", f"{per_step:.4f}",
                         "-" if b == PEER else fmt_ratio(per_step, peer_step)])
    rows.sort(key=lambda r: (r[1], r[0] == PEER))
    header = ["backend", "dtype", "model", "steps", "steps/s", "s/step", f"x {PEER}"]
    return table(header, rows, 3)


def describe(record):
    """A record's numbers as "key value", and of a list of objects each item's words and numbers (lminv's machine
    record: read and copy rates, and a list of GEMM rates), whatever the keys are."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    out = []
    for k, v in record.items():
        if number(v):
            out.append(f"{k} {v:.4g}")
        elif isinstance(v, list) and all(isinstance(item, dict) for item in v):
            for item in v:
                words = [str(x) for x in item.values() if isinstance(x, str) and x]
                rates = [key for key, x in item.items() if number(x) and key.endswith("per_s")]
                numbers = [f"{item[key]:.4g} {key}" for key in rates]
                numbers = numbers or [f"{x:.4g}" for x in item.values() if number(x)]
                out.append(f"{k}: " + " ".join(words + numbers))
    return out


def main():
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0 if len(sys.argv) >= 2 else 2
    records = read_records(sys.argv[1:])
    for r in records:
        if r.get("kind") == "machine":
            print("lminv machine: " + ", ".join(describe(r)))
    peer_info = next((r for r in records if r.get("kind") == "step" and r.get("backend") == PEER), None)
    if peer_info:
        print(f"{PEER}: torch {peer_info.get('torch_version', '?')}, {peer_info.get('threads', '?')} threads, BLAS "
              f"threads {peer_info.get('blas_threads', '?')}; {peer_info.get('blas', '?')}")
    rates = [r for r in records if r.get("kind") == "peer_gemm"]
    if rates:
        print(f"{PEER} GEMM (torch.mm 2048^3, LibTorch's BLAS): " +
              ", ".join(f"{r['dtype']} {r['flop_per_s'] / 1e9:.0f} GFLOP/s" for r in rates))
    print("\nstep: seconds per step (forward + loss + input gradient); lminv / peer below 1: lminv faster\n")
    print(step_table(records))
    loops = loop_table(records)
    if loops:
        print("\ninversion loop (lminv run's time_s.optimize and the peer's same region); x pytorch = s/step over the "
              "peer's\n")
        print(loops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
