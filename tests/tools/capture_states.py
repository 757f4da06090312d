#!/usr/bin/env python3
"""Hidden states of a checkpoint computed by PyTorch, independently of lminv, for `lminv invert`.

GPT-2 is computed by this file's own model (below). Llama, Mistral, Qwen2 and GPT-NeoX folders are computed by
make_family_golden.py's Hugging Face-semantics model (hf_model: its modules follow transformers' modeling files, and
its golden fixtures are checked against lminv's second implementation there), in float64, float32 or bfloat16.

The states are what lminv calls `head = none` with `blocks = k`: the residual stream after k blocks, without the final
layer norm (docs/architecture.md; sdk/include/lminv/architecture.hpp): h_0 = wte[ids] + wpe[0:T], h_i =
block_{i-1}(h_{i-1}), output h_k, one row per position. The model is a Hugging Face GPT-2 folder (config.json +
model.safetensors, as `lminv init` writes it); Hugging Face GPT2Block semantics in eval mode (pre-LayerNorm, Conv1D
[in, out], q|k|v split, scores / sqrt(head_dim), causal mask at the dtype's lowest value, gelu_new).

  capture_states.py --model DIR --ids 464,6766,318 --blocks 2 --out states.safetensors
  capture_states.py --model DIR --prompts prompts.jsonl --blocks 2 --compute bfloat16 --store bfloat16 \
      --sigma 1e-3 --out set.safetensors
  capture_states.py --compare A.safetensors B.safetensors   # relative differences of two states files
  capture_states.py --check-only                            # self-checks only
  capture_states.py --fixtures [--out-dir tests/data/states] # the reader's test fixtures (numpy only)

--compute: float64, float32 and bfloat16 run natively in torch (CPU); float16, which torch 1.13 cannot compute on the
CPU, runs each operation in float32 and rounds its result to float16 (as f16 GPU kernels with f32 accumulation do),
on weights rounded to float16. --store: the dtype written (float64, float32, bfloat16, float16; NumPy has no bfloat16).
--sigma S adds Gaussian noise of relative size S: at each position t, h_t += S * ||h_t|| * z_t / ||z_t|| with z_t
~ N(0, I) (seeded by --seed), so that ||noise_t|| / ||h_t|| is exactly S before storage rounding.

Output (by --out's extension):
  .safetensors  one prompt: tensor "output" [T, D] ([1, T, D] with --batch-dim), metadata blocks, head ("none"),
                prompt_ids (a JSON list), model, compute, stored, sigma, seed, source. Several prompts: one tensor per
                prompt, named "0", "1", ... with metadata "<name>.prompt_ids"; with --stack one "output" [N, T, D]
                (equal T) and prompt_ids a list of N lists.
  .npz          the same arrays as members (no metadata: NumPy files have none).
  .npy          one prompt [T, D] ([1, T, D]); several prompts need --stack ([N, T, D]).
  .jsonl        one prompt file per line beside the manifest (folder STEM/, NAME.safetensors or --member-format npy)
                and the manifest {"states": "STEM/0.safetensors", "ids": [...]} that `lminv sweep --states` reads.

--prompts FILE: JSON Lines, one {"ids": [...]} a line (other keys ignored).
"""

import argparse
import contextlib
import json
import math
import os
import struct
import sys
import time
import unittest.mock

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16}
STORED_NAMES = {"float64": "F64", "float32": "F32", "bfloat16": "BF16", "float16": "F16"}
NUMPY_DTYPES = {"float64": "<f8", "float32": "<f4", "float16": "<f2"}


# ---- safetensors (no `safetensors` package needed) ---------------------------------------------------------------


def read_safetensors(path):
    """{name: float64 numpy array}, metadata, {name: stored dtype}."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    metadata = header.pop("__metadata__", {})
    tensors, dtypes = {}, {}
    for name, e in header.items():
        begin, end = e["data_offsets"]
        blob = data[begin:end]
        if e["dtype"] == "BF16":
            bits = np.frombuffer(blob, dtype="<u2").astype(np.uint32) << 16
            a = bits.view(np.float32).astype(np.float64)
        else:
            a = np.frombuffer(blob, dtype={"F64": "<f8", "F32": "<f4", "F16": "<f2"}[e["dtype"]]).astype(np.float64)
        tensors[name] = a.reshape(e["shape"])
        dtypes[name] = e["dtype"]
    return tensors, metadata, dtypes


def stored_bytes(t, store):
    """A float64 torch tensor rounded to `store` (round to nearest even) as little-endian bytes."""
    r = t.to(TORCH_DTYPES[store]).contiguous()
    if store == "bfloat16":
        return r.view(torch.int16).numpy().astype("<i2").tobytes()
    return r.numpy().astype(NUMPY_DTYPES[store]).tobytes()


def write_safetensors(path, tensors, metadata):
    """tensors: {name: (stored dtype name, shape, bytes)}; compact JSON header, padded to 8 bytes, name order."""
    header = {"__metadata__": dict(metadata)} if metadata else {}
    blobs, offset = [], 0
    for name in sorted(tensors):
        dtype, shape, blob = tensors[name]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


# ---- the model ---------------------------------------------------------------------------------------------------


def load_gpt2(folder):
    """(cfg, W): config.json's sizes and the weights as float64 tensors under lminv's canonical names (no
    "transformer." prefix)."""
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    if config.get("model_type") != "gpt2":
        sys.exit(f"{folder}/config.json: model_type {config.get('model_type')!r}: this script computes GPT-2 only")
    if config.get("activation_function", "gelu_new") != "gelu_new":
        sys.exit(f"{folder}/config.json: activation_function {config['activation_function']!r} is not gelu_new")
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if config.get(key):
            sys.exit(f"{folder}/config.json: {key} = true is not computed here")
    cfg = {k: config[k] for k in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")}
    cfg["layer_norm_epsilon"] = config.get("layer_norm_epsilon", 1e-5)
    cfg["n_inner"] = config.get("n_inner") or 4 * cfg["n_embd"]
    tensors, _, _ = read_safetensors(os.path.join(folder, "model.safetensors"))
    W = {}
    for name, a in tensors.items():
        name = name[len("transformer."):] if name.startswith("transformer.") else name
        W[name] = torch.from_numpy(a.copy())
    return cfg, W


class Arithmetic:
    """The dtype the model computes in: `dtype` for torch's operations, `round` after each one. float16 computes in
    float32 and rounds each result to float16; the others are native (round is the identity)."""

    def __init__(self, compute):
        self.name = compute
        if compute == "float16":
            self.dtype = torch.float32
            self.round = lambda t: t.to(torch.float16).to(torch.float32)
        else:
            self.dtype = TORCH_DTYPES[compute]
            self.round = lambda t: t


def layer_norm(x, w, b, eps, r):
    mean = r(x.mean(dim=-1, keepdim=True))
    c = r(x - mean)
    var = r((c * c).mean(dim=-1, keepdim=True))
    return r(r(c / r(torch.sqrt(var + eps))) * w + b)


def gelu_new(x, r):
    inner = r(math.sqrt(2.0 / math.pi) * r(x + r(0.044715 * r(x * r(x * x)))))
    return r(0.5 * x * r(1.0 + r(torch.tanh(inner))))


def linear(x, w, b, r):
    return r(r(x @ w) + b)


def block(h, W, i, cfg, r):
    p = f"h.{i}."
    eps = cfg["layer_norm_epsilon"]
    B, T, d = h.shape
    nh = cfg["n_head"]
    hd = d // nh
    a = layer_norm(h, W[p + "ln_1.weight"], W[p + "ln_1.bias"], eps, r)
    q, k, v = linear(a, W[p + "attn.c_attn.weight"], W[p + "attn.c_attn.bias"], r).split(d, dim=2)
    heads = lambda t: t.reshape(B, T, nh, hd).permute(0, 2, 1, 3)
    q, k, v = heads(q), heads(k), heads(v)
    scores = r(r(q @ k.transpose(-1, -2)) / math.sqrt(hd))
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    scores = torch.where(causal, scores, torch.full([], torch.finfo(scores.dtype).min, dtype=scores.dtype))
    probs = r(F.softmax(scores, dim=-1))
    out = r(probs @ v).permute(0, 2, 1, 3).reshape(B, T, d)
    h = r(h + linear(out, W[p + "attn.c_proj.weight"], W[p + "attn.c_proj.bias"], r))
    m = layer_norm(h, W[p + "ln_2.weight"], W[p + "ln_2.bias"], eps, r)
    m = gelu_new(linear(m, W[p + "mlp.c_fc.weight"], W[p + "mlp.c_fc.bias"], r), r)
    return r(h + linear(m, W[p + "mlp.c_proj.weight"], W[p + "mlp.c_proj.bias"], r))


# The other families: config.json as Hugging Face writes it, tensors under their Hugging Face names.
FAMILY_TYPES = ("llama", "mistral", "qwen2", "gpt_neox")


def load_model(folder):
    """(cfg, W, family): GPT-2 through load_gpt2, the other families' config.json and tensors as stored."""
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    family = config.get("model_type")
    if family == "gpt2":
        cfg, W = load_gpt2(folder)
        return cfg, W, family
    if family not in FAMILY_TYPES:
        sys.exit(f"{folder}/config.json: model_type {family!r}: this script computes gpt2, " + ", ".join(FAMILY_TYPES))
    if config.get("rope_scaling"):
        sys.exit(f"{folder}/config.json: rope_scaling {config['rope_scaling']!r} is not computed here")
    act = config.get("hidden_act", "gelu" if family == "gpt_neox" else "silu")
    if act != ("gelu" if family == "gpt_neox" else "silu"):
        sys.exit(f"{folder}/config.json: hidden_act {act!r} is not computed here for {family}")
    config.setdefault("rope_theta", 10000.0)
    config.setdefault("rotary_emb_base", 10000.0)
    config.setdefault("use_parallel_residual", True)
    files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not files:
        sys.exit(f"{folder}: no .safetensors file")
    W = {}
    for name in files:
        tensors, _, _ = read_safetensors(os.path.join(folder, name))
        W.update({k: torch.from_numpy(a.copy()) for k, a in tensors.items()})
    cfg = {"n_layer": config["num_hidden_layers"], "vocab_size": config["vocab_size"],
           "n_positions": config.get("max_position_embeddings", 2048), "config": config}
    return cfg, W, family


def family_hidden_states(ids, W, cfg, blocks, arithmetic):
    """h_blocks [T, d] as float64 for a Llama, Mistral, Qwen2 or GPT-NeoX model, by make_family_golden.hf_model."""
    if arithmetic.name == "float16":
        sys.exit("--compute float16 is emulated for GPT-2 only; use float64, float32 or bfloat16")
    check_prompt(ids, cfg, blocks)
    sys.path.insert(0, HERE)
    import make_family_golden as family
    c = cfg["config"]
    Wc = {k: v.to(arithmetic.dtype) for k, v in W.items()}
    embed = Wc["gpt_neox.embed_in.weight" if c["model_type"] == "gpt_neox" else "model.embed_tokens.weight"]
    x = embed[torch.tensor(ids)].unsqueeze(0)
    with torch.no_grad():
        return family.hf_model(x, Wc, c, blocks, "none", "embedding")[0].to(torch.float64)


def check_prompt(ids, cfg, blocks):
    if not 0 <= blocks <= cfg["n_layer"]:
        sys.exit(f"--blocks {blocks}: the model has {cfg['n_layer']} blocks")
    if not 1 <= len(ids) <= cfg["n_positions"]:
        sys.exit(f"a prompt of {len(ids)} tokens: the model takes 1 .. {cfg['n_positions']}")
    if any(not 0 <= i < cfg["vocab_size"] for i in ids):
        sys.exit(f"token ids {ids}: outside the vocabulary 0 .. {cfg['vocab_size'] - 1}")


def hidden_states(ids, W, cfg, blocks, arithmetic):
    """h_blocks [T, d] as float64 (computed in `arithmetic`), for token ids `ids` (GPT-2)."""
    check_prompt(ids, cfg, blocks)
    r = arithmetic.round
    Wc = {k: r(v.to(arithmetic.dtype)) for k, v in W.items()}
    x = Wc["wte.weight"][torch.tensor(ids)]
    h = r(x + Wc["wpe.weight"][:len(ids)]).unsqueeze(0)
    with torch.no_grad():
        for i in range(blocks):
            h = block(h, Wc, i, cfg, r)
    return h[0].to(torch.float64)


def add_noise(h, sigma, generator):
    """h_t + sigma ||h_t|| z_t / ||z_t||, z_t ~ N(0, I): relative size exactly sigma at every position."""
    if sigma == 0:
        return h
    z = torch.randn(h.shape, generator=generator, dtype=torch.float64)
    z = z / z.norm(dim=-1, keepdim=True)
    return h + sigma * h.norm(dim=-1, keepdim=True) * z


# ---- self-check --------------------------------------------------------------------------------------------------


def self_check():
    """This file's model against make_gpt2_golden.py's (itself checked against torch's modules) in float64, on the
    golden checkpoint and on random weights; float32 and float16 emulation within their rounding of float64."""
    sys.path.insert(0, HERE)
    import make_gpt2_golden as golden

    torch.manual_seed(0)
    folder = os.path.join(ROOT, "tests", "data", "gpt2-golden", "checkpoint-f64")
    cfg, W = load_gpt2(folder)
    ids = [31, 0, 49, 7, 12, 31]
    f64 = Arithmetic("float64")
    worst = 0.0
    for blocks in range(cfg["n_layer"] + 1):
        x = W["wte.weight"][torch.tensor(ids)].unsqueeze(0)
        expected = golden.gpt2(x, W, cfg, blocks, "none", "embedding")[0]
        got = hidden_states(ids, W, cfg, blocks, f64)
        err = ((got - expected).norm() / expected.norm()).item()
        worst = max(worst, err)
        assert err < 1e-13, f"blocks {blocks}: {err} from make_gpt2_golden's model"
    # Causality: a prefix's states do not depend on what follows.
    full = hidden_states(ids, W, cfg, cfg["n_layer"], f64)
    prefix = hidden_states(ids[:3], W, cfg, cfg["n_layer"], f64)
    assert torch.equal(full[:3], prefix) or (full[:3] - prefix).abs().max() < 1e-14
    # Reduced precisions: within a few hundred units of their rounding of the float64 result.
    for compute, unit in (("float32", 2.0 ** -24), ("float16", 2.0 ** -11), ("bfloat16", 2.0 ** -8)):
        got = hidden_states(ids, W, cfg, cfg["n_layer"], Arithmetic(compute))
        err = ((got - full).norm() / full.norm()).item()
        assert 0 < err < 50 * unit, f"{compute}: relative error {err}, unit {unit}"
        print(f"  {compute:9s} vs float64: relative error {err:.3g} ({err / unit:.1f} units of {unit:.3g})")
    # Noise of relative size sigma.
    g = torch.Generator().manual_seed(1)
    noisy = add_noise(full, 0.01, g)
    rel = ((noisy - full).norm(dim=-1) / full.norm(dim=-1))
    assert (rel - 0.01).abs().max() < 1e-12
    print(f"self-check passed: float64 within {worst:.3g} of make_gpt2_golden.py's model at blocks 0..{cfg['n_layer']}")


# ---- writing states ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def fixed_zip_time():
    """np.savez stamps members with the time of day; a fixed one makes the fixtures' bytes reproducible."""
    with unittest.mock.patch("zipfile.time.localtime", lambda *_: time.struct_time((2024, 1, 1, 0, 0, 0, 0, 1, 0))):
        yield


def write_states(out, prompts, states, store, metadata, stack=False, batch_dim=False, member_format="safetensors"):
    """prompts: the id lists; states: their float64 [T, D] tensors."""
    ext = os.path.splitext(out)[1].lower()
    single = len(prompts) == 1
    if store == "bfloat16" and (ext in (".npy", ".npz") or (ext == ".jsonl" and member_format == "npy")):
        sys.exit("--store bfloat16: NumPy files have no bfloat16; write safetensors")
    if stack and len({s.shape[0] for s in states}) != 1:
        sys.exit("--stack: the prompts have different lengths")
    if ext == ".jsonl":
        stem = os.path.splitext(os.path.basename(out))[0]
        folder = os.path.join(os.path.dirname(os.path.abspath(out)), stem)
        os.makedirs(folder, exist_ok=True)
        with open(out, "w") as manifest:
            for i, (ids, h) in enumerate(zip(prompts, states)):
                member = os.path.join(folder, f"{i}.{member_format}")
                write_states(member, [ids], [h], store, metadata, batch_dim=batch_dim)
                manifest.write(json.dumps({"states": f"{stem}/{i}.{member_format}", "ids": ids}) + "\n")
        return
    # The arrays to write: name -> float64 tensor.
    if single and not stack:
        arrays = {"output": states[0].unsqueeze(0) if batch_dim else states[0]}
    elif stack:
        arrays = {"output": torch.stack(states)}
    else:
        arrays = {str(i): (h.unsqueeze(0) if batch_dim else h) for i, h in enumerate(states)}
    if ext == ".safetensors":
        meta = dict(metadata)
        if len(arrays) == 1:
            meta["prompt_ids"] = json.dumps(prompts[0] if single and not stack else prompts)
        else:
            for i, ids in enumerate(prompts):
                meta[f"{i}.prompt_ids"] = json.dumps(ids)
        write_safetensors(out, {n: (STORED_NAMES[store], list(a.shape), stored_bytes(a, store))
                                for n, a in arrays.items()}, meta)
    elif ext in (".npy", ".npz"):
        np_arrays = {n: a.to(TORCH_DTYPES[store]).numpy() for n, a in arrays.items()}
        if ext == ".npy":
            if len(np_arrays) != 1:
                sys.exit("--out FILE.npy holds one array: give --stack for several prompts, or write .npz")
            np.save(out, next(iter(np_arrays.values())))
        else:
            with fixed_zip_time():
                np.savez(out, **np_arrays)
    else:
        sys.exit(f"--out {out}: write .safetensors, .npy, .npz or .jsonl")


def read_prompts(args):
    if args.ids:
        return [[int(x) for x in args.ids.split(",")]]
    prompts = []
    with open(args.prompts) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            entry = json.loads(line)
            if not isinstance(entry, dict) or not isinstance(entry.get("ids"), list):
                sys.exit(f"{args.prompts}:{number}: not an object with \"ids\": [...]")
            prompts.append([int(x) for x in entry["ids"]])
    if not prompts:
        sys.exit(f"{args.prompts}: no prompts")
    return prompts


def capture(args):
    cfg, W, family = load_model(args.model)
    prompts = read_prompts(args)
    arithmetic = Arithmetic(args.compute)
    generator = torch.Generator().manual_seed(args.seed)
    compute = hidden_states if family == "gpt2" else family_hidden_states
    states = [add_noise(compute(ids, W, cfg, args.blocks, arithmetic), args.sigma, generator) for ids in prompts]
    metadata = {"blocks": str(args.blocks), "head": "none", "model": family, "compute": args.compute,
                "stored": STORED_NAMES[args.store], "sigma": repr(args.sigma), "seed": str(args.seed),
                "source": "tests/tools/capture_states.py (PyTorch " + torch.__version__ + ")"}
    write_states(args.out, prompts, states, args.store, metadata, args.stack, args.batch_dim, args.member_format)
    print(f"wrote {args.out}: {len(prompts)} prompt(s), blocks {args.blocks}, head none, computed in {args.compute}, "
          f"stored {args.store}, sigma {args.sigma}")


# ---- comparing two states files ----------------------------------------------------------------------------------


def load_states(path, name=None):
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        return np.load(path).astype(np.float64)
    if ext == ".npz":
        z = np.load(path)
        key = name or ("output" if "output" in z.files else z.files[0])
        return z[key].astype(np.float64)
    tensors, _, _ = read_safetensors(path)
    return tensors[name or ("output" if "output" in tensors else next(iter(tensors)))]


def compare(a_path, b_path):
    a = load_states(a_path).reshape(-1, load_states(a_path).shape[-1])
    b = load_states(b_path).reshape(-1, load_states(b_path).shape[-1])
    if a.shape != b.shape:
        sys.exit(f"shapes differ: {a.shape} and {b.shape}")
    per_position = np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)
    overall = np.linalg.norm(a - b) / np.linalg.norm(b)
    max_entry = np.abs(a - b).max() / np.abs(b).max()
    print(f"{a_path} vs {b_path}: [{a.shape[0]}, {a.shape[1]}]")
    print(f"  relative L2 difference, whole tensor       {overall:.3e}")
    print(f"  relative L2 difference, worst position     {per_position.max():.3e} (t = {per_position.argmax()})")
    print(f"  max |a - b| / max |b|                      {max_entry:.3e}")


# ---- fixtures for tests/states_test.cpp --------------------------------------------------------------------------


def fixture_values(T=3, D=5, offset=0.0):
    """v[t, j] = (D t + j - 7) / 8 + offset: exact in float16, bfloat16, float32 and float64."""
    t = np.arange(T, dtype=np.float64)[:, None]
    j = np.arange(D, dtype=np.float64)[None, :]
    return (D * t + j - 7) / 8 + offset


def write_npy(path, array, version=None):
    with open(path, "wb") as f:
        np.lib.format.write_array(f, array, version=version, allow_pickle=False)


def make_fixtures(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    v = fixture_values()
    p = lambda name: os.path.join(out_dir, name)
    # .npy: header versions, dtypes, byte orders, Fortran order.
    write_npy(p("v1-f4.npy"), v.astype("<f4"), (1, 0))
    write_npy(p("v2-f8.npy"), v.astype("<f8"), (2, 0))
    write_npy(p("v3-f2.npy"), v.astype("<f2"), (3, 0))
    write_npy(p("be-f2.npy"), v.astype(">f2"))
    write_npy(p("be-f4.npy"), v.astype(">f4"))
    write_npy(p("be-f8.npy"), v.astype(">f8"))
    write_npy(p("fortran-f4.npy"), np.asfortranarray(v.astype("<f4")))
    write_npy(p("fortran-3d-f8.npy"), np.asfortranarray(np.arange(24, dtype="<f8").reshape(2, 3, 4)))
    write_npy(p("batch-f4.npy"), v.astype("<f4")[None])
    # float16 specials: the largest half, the smallest subnormal, -0, 1/3 rounded to half.
    write_npy(p("half-special.npy"), np.array([[65504.0, 2.0 ** -24, -0.0, 1.0 / 3.0]], dtype="<f2"))
    write_npy(p("int.npy"), np.arange(15, dtype="<i8").reshape(3, 5))
    write_npy(p("stack-f4.npy"), np.stack([v, v + 1]).astype("<f4"))
    # .npz: stored and deflated, several members.
    members = {"states": v.astype("<f4"), "other": np.eye(2, dtype="<f8"), "batch": v.astype("<f2")[None]}
    with fixed_zip_time():
        np.savez(p("savez-stored.npz"), **members)
        np.savez_compressed(p("savez-compressed.npz"), **members)
        np.savez(p("one-member.npz"), states=v.astype("<f8"))
        # A set of one prompt per member, in natural order p1, p2, p10 (T = 1, 2, 3), offset by the number.
        np.savez_compressed(p("set-members.npz"), p10=fixture_values(3, 5, 10).astype("<f4"),
                            p2=fixture_values(2, 5, 2).astype("<f4"), p1=fixture_values(1, 5, 1).astype("<f4"))
    # safetensors: F32 (beside an "input" tensor, as lminv forward writes), F16, BF16, F64; [T, D] and [1, T, D].
    meta = {"blocks": "2", "head": "none", "prompt_ids": "[464, 6766, 318]", "model": "gpt2"}
    vt = torch.from_numpy(v)
    for store in ("float32", "float16", "bfloat16", "float64"):
        tensors = {"output": (STORED_NAMES[store], [3, 5], stored_bytes(vt, store))}
        if store == "float32":
            tensors["input"] = ("F32", [3, 7], stored_bytes(torch.zeros(3, 7, dtype=torch.float64), store))
        write_safetensors(p(f"{STORED_NAMES[store].lower()}.safetensors"), tensors, meta)
    write_safetensors(p("batch-f32.safetensors"), {"output": ("F32", [1, 3, 5], stored_bytes(vt, "float32"))},
                      meta)
    # Sets: a stacked [N, T, D] tensor with a list of lists of ids; named tensors with "<name>.prompt_ids".
    stacked = torch.stack([vt, vt + 1])
    write_safetensors(p("set-stacked.safetensors"), {"output": ("F32", [2, 3, 5], stored_bytes(stacked, "float32"))},
                      {"blocks": "1", "head": "none", "prompt_ids": "[[1, 2, 3], [4, 5, 6]]"})
    named = {str(k): ("F64", [t, 5], stored_bytes(torch.from_numpy(fixture_values(t, 5, k)), "float64"))
             for k, t in ((10, 3), (2, 2), (1, 1))}
    write_safetensors(p("set-named.safetensors"), named,
                      {"blocks": "2", "10.prompt_ids": "[7, 8, 9]", "2.prompt_ids": "[5, 6]", "1.prompt_ids": "[4]"})
    with open(p("set.jsonl"), "w") as f:
        f.write(json.dumps({"states": "v1-f4.npy", "ids": [1, 2, 3]}) + "\n\n")
        f.write(json.dumps({"states": "f32.safetensors", "name": "output", "text": "ignored"}) + "\n")
        f.write(json.dumps({"states": "savez-compressed.npz", "name": "batch"}) + "\n")
    print(f"wrote the fixtures in {out_dir}")


FAMILY_FIXTURE_IDS = [5, 17, 17, 42, 3, 47, 1, 33]  # within every fixture model's vocabulary (GPT-2's: 50)


def make_family_fixtures(out_dir):
    """States of tests/data/gpt2-golden's GPT-2 and tests/data/family-golden's Llama, Mistral, Qwen2 and GPT-NeoX
    folders after their last block, for FAMILY_FIXTURE_IDS, computed here in float32 (Llama's also in bfloat16):
    invert_test inverts them with lminv."""
    os.makedirs(out_dir, exist_ok=True)
    golden = os.path.join(ROOT, "tests", "data", "family-golden")
    folders = {"gpt2": os.path.join(ROOT, "tests", "data", "gpt2-golden", "checkpoint-f64")}
    for family, computes in (("gpt2", ("float32",)), ("llama", ("float32", "bfloat16")), ("mistral", ("float32",)),
                             ("qwen2", ("float32",)), ("gpt_neox", ("float32",))):
        cfg, W, _ = load_model(folders.get(family, os.path.join(golden, family)))
        compute_states = hidden_states if family == "gpt2" else family_hidden_states
        for compute in computes:
            h = compute_states(FAMILY_FIXTURE_IDS, W, cfg, cfg["n_layer"], Arithmetic(compute))
            metadata = {"blocks": str(cfg["n_layer"]), "head": "none", "model": family, "compute": compute,
                        "stored": STORED_NAMES[compute], "sigma": "0.0", "seed": "0",
                        "source": "tests/tools/capture_states.py --family-fixtures (PyTorch " + torch.__version__ + ")"}
            out = os.path.join(out_dir, f"{family}-{compute}.safetensors")
            write_states(out, [FAMILY_FIXTURE_IDS], [h], compute, metadata)
            print(f"wrote {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a Hugging Face folder (config.json, *.safetensors) of model_type gpt2, llama, "
                    "mistral, qwen2 or gpt_neox")
    ap.add_argument("--ids", help="one prompt's token ids, comma-separated")
    ap.add_argument("--prompts", help="JSON Lines of {\"ids\": [...]}: one prompt a line")
    ap.add_argument("--blocks", type=int, help="the states after this many blocks (head none)")
    ap.add_argument("--compute", default="float64", choices=sorted(TORCH_DTYPES))
    ap.add_argument("--store", default="float32", choices=sorted(TORCH_DTYPES))
    ap.add_argument("--sigma", type=float, default=0.0, help="relative size of added Gaussian noise")
    ap.add_argument("--seed", type=int, default=0, help="the noise's seed")
    ap.add_argument("--out", help="FILE.safetensors | FILE.npy | FILE.npz | FILE.jsonl")
    ap.add_argument("--stack", action="store_true", help="several prompts as one [N, T, D] tensor")
    ap.add_argument("--batch-dim", action="store_true", help="one prompt as [1, T, D]")
    ap.add_argument("--member-format", default="safetensors", choices=["safetensors", "npy"],
                    help="the files a .jsonl manifest points to")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two states files and exit")
    ap.add_argument("--check-only", action="store_true", help="run the self-checks and exit")
    ap.add_argument("--fixtures", action="store_true", help="write the reader's test fixtures and exit")
    ap.add_argument("--family-fixtures", action="store_true",
                    help="write tests/data/states/families/ (invert_test's states of the other families) and exit")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "tests", "data", "states"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.compare:
        return compare(*args.compare)
    if args.check_only:
        return self_check()
    if args.fixtures:
        return make_fixtures(args.out_dir)
    if args.family_fixtures:
        return make_family_fixtures(os.path.join(args.out_dir, "families"))
    if not args.model or args.blocks is None or not args.out or bool(args.ids) == bool(args.prompts):
        ap.error("give --model, --blocks, --out and one of --ids or --prompts")
    self_check()
    capture(args)


if __name__ == "__main__":
    main()
