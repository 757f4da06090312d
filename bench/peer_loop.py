#!/usr/bin/python3
"""The inversion loop of `lminv run` with the descent optimizer, written in plain PyTorch: steps per second.

It mirrors plugins/optimizer-descent/descent.cpp on the model of the run's config (GPT-2, random weights, input in
embedding space): B = restarts starts a_0 ~ N(init_mean, init_std) [B, T, d], then `steps` times the per-item
loss (metric l1 | l2 | cosine) against the target O(e), its gradient with respect to the input, the best input kept,
and an update by torch.optim.SGD or torch.optim.Adam with the learning rate falling linearly from lr to lr_final
(LambdaLR); after the loop the last inputs are scored once more. e is the prompt's token embeddings (wte rows).

The timed region is the one lminv's record calls time_s.optimize (and divides the steps by for steps_per_s): from
the start's draw to the final scoring, after the target has been computed (so the model has run once). Snapshots
(the decoded attempt at given steps) are not part of this loop: run lminv with output.snapshot_steps empty to compare.

The settings come from lminv's record of the run (--record, the config sections as run, with --set applied, and the
prompt ids) or from its INI file (--config, with --set SECTION.KEY=VALUE and --tokens or --ids):

    /usr/bin/python3 bench/peer_loop.py --record runs/x/records.jsonl --out loop.jsonl
    /usr/bin/python3 bench/peer_loop.py --config configs/gpt2-12blocks-lmhead.ini --ids 464,6766,318,4171,13

--out appends one JSON line: kind "loop", backend "pytorch", dtype, model, steps, restarts, tokens, seconds,
steps_per_s, threads, blas_threads, torch_version, load_average (1 minute, at the end).
"""

import argparse
import configparser
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_pytorch as peer  # noqa: E402  (the model and the thread settings)


def fail(message):
    raise SystemExit("peer_loop: " + message)


def sections_from_ini(path, sets):
    """The INI's sections as {section: {key: text}}, with --set SECTION.KEY=VALUE applied (as lminv's --set)."""
    parser = configparser.ConfigParser(inline_comment_prefixes=("#", ";"), interpolation=None)
    parser.optionxform = str
    if not parser.read(path):
        fail(f"cannot read config '{path}'")
    sections = {name: dict(parser[name]) for name in parser.sections()}
    for s in sets:
        key, eq, value = s.partition("=")
        section, dot, name = key.partition(".")
        if not eq or not dot or not section or not name:
            fail(f"--set '{s}': expected SECTION.KEY=VALUE")
        sections.setdefault(section, {})[name] = value
    return sections


class Settings:
    """Typed reads of one section; an unreadable value fails naming the section, key and value."""

    def __init__(self, sections, section):
        self.section, self.values = section, sections.get(section, {})

    def text(self, key, default):
        return self.values.get(key, default)

    def number(self, key, default, kind=float):
        text = self.values.get(key)
        if text is None:
            return default
        try:
            return kind(text)
        except ValueError:
            fail(f"[{self.section}] {key} = '{text}' is not {'an integer' if kind is int else 'a number'}")

    def choice(self, key, default, allowed):
        value = self.values.get(key, default)
        if value not in allowed:
            fail(f"[{self.section}] {key} = '{value}': this peer mirrors only {' | '.join(allowed)}")
        return value


def loop_setup(sections):
    """The model and the optimizer's settings of a run, with descent.cpp's defaults; what the peer does not mirror
    fails here, before any work."""
    model, opt, backend = (Settings(sections, s) for s in ("model", "optimizer", "backend"))
    known = {"family", "weights", "seed", "n_layer", "n_embd", "n_head", "n_inner", "n_positions", "vocab_size",
             "blocks", "head", "input"}
    for key in sections.get("model", {}):
        if key not in known:  # the architecture keys and layers: GPT-2's own setting only
            fail(f"[model] {key}: this peer mirrors GPT-2 small's architecture and the keys {', '.join(sorted(known))}")
    model.choice("family", "gpt2", ["gpt2"])
    model.choice("input", "embedding", ["embedding"])
    head = model.choice("head", "lm_head", ["none", "ln_f", "lm_head"])
    n_layer = model.number("n_layer", 12, int)
    shape = peer.gpt2_shape(n_layer, model.number("n_embd", 768, int), model.number("n_head", 12, int),
                            model.number("vocab_size", 50257, int))
    shape.n_inner = model.number("n_inner", 0, int)
    shape.n_positions = model.number("n_positions", 1024, int)
    blocks = model.number("blocks", 1, int)
    if not 0 <= blocks <= n_layer:
        fail(f"[model] blocks = {blocks} is outside 0 .. n_layer = {n_layer}")
    dtype = backend.choice("dtype", "f64", list(peer.DTYPES))
    opt.choice("name", "descent", ["descent"])
    opt.choice("init", "noise", ["noise"])
    o = {
        "steps": opt.number("steps", 100, int),
        "lr": opt.number("lr", 0.1),
        "metric": opt.choice("metric", "l1", ["l1", "l2", "cosine"]),
        "init_mean": opt.number("init_mean", 0.5),
        "init_std": opt.number("init_std", 0.05),
        "optimiser": opt.choice("optimiser", "sgd", ["sgd", "adam"]),
        "beta1": opt.number("beta1", 0.9),
        "beta2": opt.number("beta2", 0.999),
        "eps": opt.number("eps", 1e-8),
        "restarts": opt.number("restarts", 1, int),
    }
    o["lr_final"] = opt.number("lr_final", o["lr"])
    if o["steps"] < 1 or o["restarts"] < 1 or not o["lr"] > 0:
        fail("[optimizer] steps and restarts must be >= 1 and lr > 0")
    return shape, blocks, head, dtype, o, model.number("seed", 0, int)


def losses(out, target, metric):
    """Per-item distances as lminv's metrics (sdk/include/lminv/model.hpp): l1 sum |o - t|, l2 ||o - t||_2,
    cosine 1 - <o, t> / (|o| |t|)."""
    diff = (out - target).flatten(1)
    if metric == "l1":
        return diff.abs().sum(1)
    if metric == "l2":
        return diff.norm(dim=1)
    return 1 - torch.nn.functional.cosine_similarity(out.flatten(1), target.flatten(1).expand_as(out.flatten(1)),
                                                     dim=1, eps=0)


def run_loop(model, true_input, o):
    """descent.cpp's loop; returns (seconds of the timed region, best loss)."""
    with torch.no_grad():
        target = model(true_input)
    B, T, d = o["restarts"], true_input.shape[1], true_input.shape[2]
    steps, lr, lr_final = o["steps"], o["lr"], o["lr_final"]
    start = time.perf_counter()
    x = (o["init_mean"] + o["init_std"] * torch.randn(B, T, d, dtype=torch.float64)).to(true_input.dtype)
    x.requires_grad_(True)
    if o["optimiser"] == "adam":
        opt = torch.optim.Adam([x], lr=lr, betas=(o["beta1"], o["beta2"]), eps=o["eps"])
    else:
        opt = torch.optim.SGD([x], lr=lr)
    # lr_n = lr + (lr_final - lr) (n - 1) / (steps - 1) at step n = 1 .. steps; LambdaLR's factor is of lr.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 1.0 if steps == 1 else (lr + (lr_final - lr) * i / (steps - 1)) / lr)
    best_loss = torch.full((B,), math.inf, dtype=torch.float64)
    best_input = x.detach().clone()

    def keep_best(loss):
        better = loss.double() < best_loss
        best_loss[better] = loss.double()[better]
        best_input[better] = x.detach()[better]

    for _ in range(steps):
        opt.zero_grad()
        loss = losses(model(x), target, o["metric"])
        loss.sum().backward()
        keep_best(loss.detach())
        opt.step()
        schedule.step()
    with torch.no_grad():  # the inputs after the last update
        keep_best(losses(model(x), target, o["metric"]))
    seconds = time.perf_counter() - start
    return seconds, best_loss.min().item()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--record", help="lminv run's records.jsonl: the last record's config and prompt ids")
    src.add_argument("--config", help="an lminv INI config")
    p.add_argument("--set", action="append", default=[], help="SECTION.KEY=VALUE (with --config)")
    p.add_argument("--ids", help="prompt token ids, comma-separated (with --config; default: --tokens random ids)")
    p.add_argument("--tokens", type=int, default=5, help="prompt length when no ids are given")
    p.add_argument("--steps", type=int, default=0, help="override [optimizer] steps")
    p.add_argument("--threads", type=peer.thread_count, default=0,
                   help="torch.set_num_threads; 0: all cores (lminv's default); default: torch's own setting")
    p.add_argument("--blas-threads", type=int, default=0,
                   help="set OpenBLAS's threads too (0: leave them as the library starts, as a PyTorch user does)")
    p.add_argument("--out", help="append a JSON line to FILE")
    args = p.parse_args()

    if args.record:
        lines = [line for line in open(args.record) if line.strip()]
        if not lines:
            fail(f"'{args.record}' holds no record")
        record = json.loads(lines[-1])
        sections, ids = record["config"], record["prompt"]["ids"]
        label = record.get("config_file", args.record)
    else:
        sections = sections_from_ini(args.config, args.set)
        if args.ids:
            try:
                ids = [int(w) for w in args.ids.split(",") if w]
            except ValueError:
                fail(f"--ids '{args.ids}': expected comma-separated integers")
        else:
            ids = None
        label = args.config
    if args.steps:
        sections.setdefault("optimizer", {})["steps"] = str(args.steps)
    shape, blocks, head, dtype_name, o, seed = loop_setup(sections)
    if ids is None:
        if args.tokens < 1:
            fail("--tokens must be >= 1")
        ids = torch.randint(0, shape.vocab, (args.tokens,), generator=torch.Generator().manual_seed(seed)).tolist()
    if not ids or max(ids) >= shape.vocab or min(ids) < 0:
        fail(f"prompt ids must be in 0 .. {shape.vocab - 1}")
    if len(ids) > shape.n_positions:
        fail(f"{len(ids)} prompt tokens exceed n_positions = {shape.n_positions}")

    threads = peer.apply_threads(args.threads)
    if args.blas_threads < 0:
        fail("--blas-threads must be >= 0")
    if args.blas_threads:
        peer.set_blas_threads(args.blas_threads)
    blas_threads = peer.blas_description()[1]
    dtype = peer.DTYPES[dtype_name]
    # The model with its tied head, whose wte also gives the true input's rows.
    model = peer.make_model(shape, blocks, "lm_head", dtype, seed)
    wte = model.wte.weight
    if head != "lm_head":
        model.lm_head = None
        if head == "none":
            model.ln_f = None
    true_input = wte[torch.tensor(ids)].unsqueeze(0).detach().clone()
    torch.manual_seed(seed)
    seconds, best = run_loop(model, true_input, o)
    rate = o["steps"] / seconds
    weights = Settings(sections, "model").text("weights", "random")
    print(f"peer_loop: {label}: gpt2 blocks {blocks}/{shape.n_layer} head {head}, {dtype_name}, T {len(ids)}, "
          f"random weights{'' if weights == 'random' else ' (the run read ' + weights + ')'}, "
          f"{o['optimiser']} {o['metric']} lr {o['lr']} -> {o['lr_final']}, restarts {o['restarts']}, {threads} "
          f"threads (BLAS {blas_threads}): {o['steps']} steps in {seconds:.3f} s, {rate:.3f} steps/s "
          f"(best loss {best:.4e})")
    if args.out:
        out = {"kind": "loop", "backend": "pytorch", "dtype": dtype_name,
               "model": f"gpt2 blocks {blocks} head {head}",
               "steps": o["steps"], "restarts": o["restarts"], "tokens": len(ids), "seconds": seconds,
               "steps_per_s": rate, "threads": threads,
               "blas_threads": blas_threads, "torch_version": torch.__version__, "config": label,
               "load_average": os.getloadavg()[0]}
        with open(args.out, "a") as f:
            f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
