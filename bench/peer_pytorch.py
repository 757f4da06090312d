#!/usr/bin/python3
"""The plain PyTorch peer of `lminv bench`: the same inversion step, written as a PyTorch user would write it.

One step, as host/bench.cpp times it: a decoder of random weights (GPT-2 of the given sizes, or the published shapes
of Pythia-160M and TinyLlama-1.1B), an input x [B, T, d] in embedding space (the model adds its learned positions,
runs its blocks and, for the "-lmhead" models, the final norm and the lm_head), the l2 loss of each item against a
target (lminv's Metric::l2: ||o - t||_2 per item, sdk/include/lminv/model.hpp), and the gradient of the losses with
respect to x:

    out = model(x)
    loss = (out - target).flatten(1).norm(dim=1)       # one loss per item
    (g,) = torch.autograd.grad(loss.sum(), x)

The target is the model's output for item 0, as in lminv bench; the input is N(0, 0.02). The weights are frozen
(requires_grad_(False)), so autograd computes the input gradient only. Timing: one warm-up step, then the best of
--repeat steps. Threads: by default torch's own start-up setting (ATen's pool at half the CPUs on x86, OpenBLAS at all of them),
which is what a PyTorch user runs with and, on a 2-core machine with Debian's pthreads OpenBLAS, the same split
lminv's torch backend makes (ATen 1, OpenBLAS 2); `--threads N` calls torch.set_num_threads(N) (0: every CPU this
process may run on). Two ATen threads beside OpenBLAS's two on 2 cores made the peer about 2x slower (measured). The BLAS library LibTorch calls keeps its own thread setting (torch does not set
OpenBLAS's); it is reported, and --blas-threads changes it.

    /usr/bin/python3 bench/peer_pytorch.py --dtypes f32 --models 12blocks-lmhead --batches 1,32 --out peer.jsonl
    /usr/bin/python3 bench/peer_pytorch.py --check      # the module against tests/tools' independent models

--out appends JSON Lines records with the keys lminv bench writes for kind "step" (backend "pytorch", dtype, model,
batch, tokens, seconds_per_step, flops_per_step), plus threads, blas_threads, torch_version, blas and the 1-minute
load average when the cell ended (the machine may be shared: a load above the thread count makes the time noise).
"""

import argparse
import ctypes
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16}


# ---- the shapes (host/bench.cpp's bench_spec, with host/families/'s architectures) -------------------------------


class Shape:
    """A decoder's sizes and architecture, as sdk/include/lminv/architecture.hpp names the fields."""

    def __init__(self, **fields):
        self.n_layer = 12
        self.n_embd = 768
        self.n_head = 12
        self.n_kv_head = 0  # 0: n_head
        self.n_inner = 0  # 0: 4 n_embd
        self.vocab = 50257
        self.n_positions = 1024
        self.norm = "layer_norm"  # or "rms_norm"
        self.norm_eps = 1e-5
        self.positions = "learned"  # or "rotary"
        self.rope_theta = 10000.0
        self.rotary_fraction = 1.0
        self.qkv_bias = True
        self.attn_out_bias = True
        self.mlp = "gelu_tanh"  # or "gelu_erf", "swiglu"
        self.mlp_bias = True
        self.residual = "sequential"  # or "parallel"
        self.tied_head = True
        for k, v in fields.items():
            if not hasattr(self, k):
                raise ValueError(f"Shape: unknown field '{k}'")
            setattr(self, k, v)

    def kv_heads(self):
        return self.n_kv_head or self.n_head

    def inner(self):
        return self.n_inner or 4 * self.n_embd

    def head_size(self):
        return self.n_embd // self.n_head

    def rotary_dim(self):
        if self.positions != "rotary":
            return 0
        r = int(math.floor(self.head_size() * self.rotary_fraction))
        return r - r % 2


def gpt2_shape(n_layer=12, n_embd=768, n_head=12, vocab=50257):
    return Shape(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab=vocab)


def pythia_160m_shape():
    """EleutherAI/pythia-160m (lminv's gpt_neox family): rotary on a quarter of each head, erf GELU, parallel
    residual, untied head."""
    return Shape(n_layer=12, n_embd=768, n_head=12, n_inner=3072, vocab=50304, n_positions=2048,
                 positions="rotary", rotary_fraction=0.25, mlp="gelu_erf", residual="parallel", tied_head=False)


def tinyllama_shape():
    """TinyLlama-1.1B (lminv's llama family): RMSNorm, rotary, 4 kv heads for 32 query heads, SwiGLU, no biases."""
    return Shape(n_layer=22, n_embd=2048, n_head=32, n_kv_head=4, n_inner=5632, vocab=32000, n_positions=2048,
                 norm="rms_norm", norm_eps=1e-5, positions="rotary", qkv_bias=False, attn_out_bias=False,
                 mlp="swiglu", mlp_bias=False, tied_head=False)


def model_case(name, args):
    """lminv bench's model names -> (shape, blocks, head)."""
    gpt2 = gpt2_shape(args.n_layer, args.n_embd, args.n_head, args.vocab)
    if name == "1block":
        return gpt2, 1, "none"
    if name == "12blocks":
        return gpt2, args.n_layer, "none"
    if name == "12blocks-lmhead":
        return gpt2, args.n_layer, "lm_head"
    for shape_name, make in (("pythia-160m", pythia_160m_shape), ("tinyllama-1.1b", tinyllama_shape)):
        if name == shape_name:
            s = make()
            return s, s.n_layer, "none"
        if name == shape_name + "-lmhead":
            s = make()
            return s, s.n_layer, "lm_head"
    raise SystemExit(f"peer_pytorch: unknown model '{name}' "
                     "(1block | 12blocks | 12blocks-lmhead | pythia-160m[-lmhead] | tinyllama-1.1b[-lmhead])")


# ---- the model -------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):  # torch 1.13 has none
    def __init__(self, d, eps, dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d, dtype=dtype))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(s, dtype):
    if s.norm == "rms_norm":
        return RMSNorm(s.n_embd, s.norm_eps, dtype)
    return nn.LayerNorm(s.n_embd, eps=s.norm_eps, dtype=dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Causal self-attention, q | k | v from one projection, grouped kv heads, rotary positions on the first
    rotary_dim features of each head (Hugging Face's rotate_half layout)."""

    def __init__(self, s, dtype):
        super().__init__()
        self.nh, self.nkv, self.hd, self.r = s.n_head, s.kv_heads(), s.head_size(), s.rotary_dim()
        self.c_attn = nn.Linear(s.n_embd, (self.nh + 2 * self.nkv) * self.hd, bias=s.qkv_bias, dtype=dtype)
        self.c_proj = nn.Linear(self.nh * self.hd, s.n_embd, bias=s.attn_out_bias, dtype=dtype)

    def forward(self, x, rope):
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        q = q.view(B, T, self.nh, self.hd).transpose(1, 2)  # [B, nh, T, hd]
        k = k.view(B, T, self.nkv, self.hd).transpose(1, 2)
        v = v.view(B, T, self.nkv, self.hd).transpose(1, 2)
        if self.r:
            cos, sin = rope
            r = self.r
            q = torch.cat((q[..., :r] * cos + rotate_half(q[..., :r]) * sin, q[..., r:]), dim=-1)
            k = torch.cat((k[..., :r] * cos + rotate_half(k[..., :r]) * sin, k[..., r:]), dim=-1)
        if self.nkv != self.nh:
            k = k.repeat_interleave(self.nh // self.nkv, dim=1)
            v = v.repeat_interleave(self.nh // self.nkv, dim=1)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.hd))
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, self.nh * self.hd)
        return self.c_proj(y)


class Mlp(nn.Module):
    def __init__(self, s, dtype):
        super().__init__()
        self.kind = s.mlp
        width = 2 * s.inner() if s.mlp == "swiglu" else s.inner()  # swiglu: c_fc = [gate | up]
        self.c_fc = nn.Linear(s.n_embd, width, bias=s.mlp_bias, dtype=dtype)
        self.c_proj = nn.Linear(s.inner(), s.n_embd, bias=s.mlp_bias, dtype=dtype)

    def forward(self, x):
        u = self.c_fc(x)
        if self.kind == "swiglu":
            gate, up = u.chunk(2, dim=-1)
            u = F.silu(gate) * up
        else:
            u = F.gelu(u, approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return self.c_proj(u)


class Block(nn.Module):
    def __init__(self, s, dtype):
        super().__init__()
        self.parallel = s.residual == "parallel"
        self.ln_1 = make_norm(s, dtype)
        self.attn = Attention(s, dtype)
        self.ln_2 = make_norm(s, dtype)
        self.mlp = Mlp(s, dtype)

    def forward(self, h, rope):
        if self.parallel:
            return h + self.attn(self.ln_1(h), rope) + self.mlp(self.ln_2(h))
        h = h + self.attn(self.ln_1(h), rope)
        return h + self.mlp(self.ln_2(h))


class Decoder(nn.Module):
    """The first `blocks` blocks of a decoder on inputs in embedding space [B, T, d]; head "none" (the residual
    stream after the last block), "ln_f" or "lm_head" (the logits, tied to wte or untied)."""

    def __init__(self, s, blocks, head, dtype):
        super().__init__()
        self.shape, self.head = s, head
        self.wpe = nn.Embedding(s.n_positions, s.n_embd, dtype=dtype) if s.positions == "learned" else None
        self.h = nn.ModuleList([Block(s, dtype) for _ in range(blocks)])
        self.ln_f = make_norm(s, dtype) if head != "none" else None
        self.lm_head = None
        if head == "lm_head":
            self.lm_head = nn.Linear(s.n_embd, s.vocab, bias=False, dtype=dtype)
            if s.tied_head:
                self.wte = nn.Embedding(s.vocab, s.n_embd, dtype=dtype)
                self.lm_head.weight = self.wte.weight
        r = s.rotary_dim()
        if r:  # cos and sin of t inv_freq[i], made in float64, each half of the rotated features [n_positions, r]
            inv_freq = s.rope_theta ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
            angles = torch.outer(torch.arange(s.n_positions, dtype=torch.float64), inv_freq)
            angles = torch.cat((angles, angles), dim=-1)
            self.register_buffer("rope_cos", angles.cos().to(dtype), persistent=False)
            self.register_buffer("rope_sin", angles.sin().to(dtype), persistent=False)

    def forward(self, x):
        T = x.shape[1]
        h = x + self.wpe(torch.arange(T, device=x.device)) if self.wpe is not None else x
        rope = (self.rope_cos[:T], self.rope_sin[:T]) if self.shape.rotary_dim() else None
        for block in self.h:
            h = block(h, rope)
        if self.ln_f is not None:
            h = self.ln_f(h)
        if self.lm_head is not None:
            h = self.lm_head(h)
        return h


def make_model(s, blocks, head, dtype, seed=0):
    """Random weights (matrices N(0, 0.02), biases 0, norms 1), frozen, in eval mode."""
    torch.manual_seed(seed)
    model = Decoder(s, blocks, head, dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
    return model.eval().requires_grad_(False)


def parameters_used(model):
    """The weights a step multiplies by, as lminv bench counts them: every matrix of the blocks run and the lm_head
    (once when tied); not the position table."""
    seen, n = set(), 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            n += m.weight.numel()
    return n


def l2_losses(out, target):
    """lminv's Metric::l2 per item: ||o - t||_2 over everything but the batch dimension."""
    return (out - target).flatten(1).norm(dim=1)


def inversion_step(model, x, target):
    """Forward, the per-item l2 losses, and their gradient with respect to the input."""
    out = model(x)
    loss = l2_losses(out, target)
    (g,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), g


# ---- threads and the BLAS --------------------------------------------------------------------------------------


def thread_count(text):
    """--threads: "default" (None: torch's own setting) or N >= 0 (0: all cores)."""
    if text == "default":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"'{text}' is not 'default' or a number >= 0")
    return int(text)


def apply_threads(threads):
    """torch.set_num_threads for --threads (None: leave torch's default); returns the count torch runs with."""
    if threads is not None:
        torch.set_num_threads(threads or all_cores())
    return torch.get_num_threads()


def all_cores():
    """lminv's "all cores": OMP_NUM_THREADS when set, else the CPUs this process may run on."""
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0))


def loaded_blas():
    """The loaded BLAS library (the file behind libblas.so.3 or an MKL / OpenBLAS in this process's maps), a ctypes
    handle to it or None."""
    paths = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1] if len(line.split()) >= 6 else ""
            base = os.path.basename(path)
            if ("blas" in base or "mkl" in base) and path not in paths:
                paths.append(path)
    handle = None
    for name in ["libblas.so.3"] + paths:
        try:
            handle = ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
            break
        except OSError:
            continue
    return paths, handle


def blas_description():
    """What torch says of its BLAS (BLAS_INFO in torch.__config__.show()), the library files loaded and, for OpenBLAS,
    its configuration, core type and thread count."""
    torch.ones(64, 64) @ torch.ones(64, 64)  # make sure the BLAS is loaded
    config = torch.__config__.show()
    info = next((part.split("=", 1)[1] for part in config.replace(",", " ").split() if part.startswith("BLAS_INFO=")),
                "?")
    paths, handle = loaded_blas()
    words = [f"BLAS_INFO={info}"] + [os.path.realpath(p) for p in paths]
    threads = None
    if handle is not None:
        for symbol in ("openblas_get_config", "openblas_get_corename"):
            f = getattr(handle, symbol, None)
            if f is not None:
                f.restype = ctypes.c_char_p
                words.append(f().decode().strip())
        get = getattr(handle, "openblas_get_num_threads", None)
        if get is not None:
            get.restype = ctypes.c_int
            threads = get()
    return "; ".join(words), threads


def set_blas_threads(n):
    _, handle = loaded_blas()
    f = getattr(handle, "openblas_set_num_threads", None) if handle is not None else None
    if f is None:
        raise SystemExit("peer_pytorch: --blas-threads: the BLAS in this process is not OpenBLAS")
    f.argtypes = [ctypes.c_int]
    f(n)


# ---- the bench ---------------------------------------------------------------------------------------------------


def best_time(repeat, f):
    """Best of `repeat` calls of f after one warm-up call, as lminv bench's best_time."""
    f()
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_rate(dtype, n=2048, repeat=3):
    """torch.mm of two n x n matrices in `dtype`, FLOP/s (best of `repeat`): the rate of the BLAS LibTorch calls, in
    the thread setting the steps run with (OpenBLAS follows OPENBLAS_CORETYPE where the environment sets it)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    with torch.no_grad():
        seconds = best_time(repeat, lambda: torch.mm(a, b))
    return 2.0 * n ** 3 / seconds


def positive_ints(text, option):
    out = []
    for word in text.split(","):
        if not word:
            continue
        if not word.isdigit() or int(word) < 1:
            raise SystemExit(f"peer_pytorch: {option}: '{word}' is not a positive integer")
        out.append(int(word))
    return out


def names(text):
    return [w for w in text.split(",") if w]


def bench(args):
    threads = apply_threads(args.threads)
    if args.blas_threads:
        set_blas_threads(args.blas_threads)
    blas, blas_threads = blas_description()
    dtypes = names(args.dtypes)
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"peer_pytorch: --dtypes: unknown dtype '{d}' (f32 | f64 | bf16)")
    models = names(args.models)
    cases = {name: model_case(name, args) for name in models}  # unknown names fail before any work
    batches = positive_ints(args.batches, "--batches")
    if args.tokens < 1 or args.repeat < 1 or args.n_layer < 1:
        raise SystemExit("peer_pytorch: --tokens, --repeat, --n-layer must be >= 1")

    print(f"peer_pytorch: torch {torch.__version__}, {threads} threads ("
          f"{'torch default' if args.threads is None else 'torch.set_num_threads'}), BLAS threads "
          f"{blas_threads if blas_threads is not None else '?'}, {args.tokens} tokens, one step = forward + l2 loss + "
          f"autograd.grad on the input, best of {args.repeat}")
    print(f"BLAS: {blas}")
    gemm = {d: gemm_rate(DTYPES[d]) for d in dtypes if d in ("f32", "f64")}
    print("GEMM  (torch.mm 2048^3, LibTorch's BLAS, GFLOP/s): " +
          "  ".join(f"{d} {rate / 1e9:.0f}" for d, rate in gemm.items()) + "\n")
    if args.out:
        with open(args.out, "a") as f:
            for d, rate in gemm.items():
                f.write(json.dumps({"kind": "peer_gemm", "backend": "pytorch", "dtype": d, "n": 2048,
                                    "flop_per_s": rate, "blas": blas, "threads": threads,
                                    "blas_threads": blas_threads}) + "\n")
    print(f"{'backend':<11}{'dtype':<6}{'model':<17}{'B':>4}{'s/step':>11}{'GFLOP/s':>10}")
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for model_name in models:
            shape, blocks, head = cases[model_name]
            if args.tokens > shape.n_positions:
                raise SystemExit(f"peer_pytorch: --tokens {args.tokens} exceeds n_positions {shape.n_positions}")
            model = make_model(shape, blocks, head, dtype)
            params = parameters_used(model)
            for batch in batches:
                torch.manual_seed(batch)
                x = (0.02 * torch.randn(batch, args.tokens, shape.n_embd, dtype=torch.float64)).to(dtype)
                x.requires_grad_(True)
                with torch.no_grad():
                    target = model(x[:1])
                seconds = best_time(args.repeat, lambda: inversion_step(model, x, target))
                flops = 4.0 * params * args.tokens * batch  # forward + input-gradient backward, as lminv counts
                print(f"{'pytorch':<11}{dtype_name:<6}{model_name:<17}{batch:>4}{seconds:>11.4f}"
                      f"{flops / seconds / 1e9:>10.1f}", flush=True)
                if args.out:
                    record = {"kind": "step", "backend": "pytorch", "dtype": dtype_name, "model": model_name,
                              "batch": batch, "tokens": args.tokens, "seconds_per_step": seconds,
                              "flops_per_step": flops, "threads": threads, "blas_threads": blas_threads,
                              "torch_version": torch.__version__, "blas": blas, "load_average": os.getloadavg()[0],
                              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                    with open(args.out, "a") as f:
                        f.write(json.dumps(record) + "\n")
            model = None  # free the weights before the next model is made
    print("\nGFLOP/s counts 4 x (parameters used) x B x T per step (forward + input-gradient backward), as lminv "
          "bench does.")


# ---- self-check --------------------------------------------------------------------------------------------------


def canonical_weights(model):
    """The module's weights under lminv's canonical names and layouts (the blocks' linear weights [in, out], a tied
    head as wte.weight)."""
    out = {}
    for name, p in model.named_parameters():  # a tied weight comes once, as lm_head.weight
        if name == "lm_head.weight" and model.shape.tied_head:
            name = "wte.weight"
        out[name] = p.detach().t().contiguous() if name.startswith("h.") and p.dim() == 2 else p.detach()
    return out


def check():
    """The module in float64 against the independent implementations in tests/tools: make_gpt2_golden.py's gpt2 and
    make_family_golden.py's canonical_model (architecture.hpp's block), output and input gradient."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "tools"))
    import make_family_golden as fam
    import make_gpt2_golden as g2

    torch.manual_seed(1)
    cases = [
        ("gpt2", Shape(n_layer=3, n_embd=16, n_head=2, vocab=50, n_positions=16)),
        ("gpt_neox", Shape(n_layer=2, n_embd=32, n_head=2, n_inner=96, vocab=60, n_positions=32, positions="rotary",
                           rotary_fraction=0.25, rope_theta=25000.0, mlp="gelu_erf", residual="parallel",
                           tied_head=False)),
        ("llama", Shape(n_layer=3, n_embd=32, n_head=4, n_kv_head=2, n_inner=80, vocab=64, n_positions=32,
                        norm="rms_norm", norm_eps=1e-5, positions="rotary", rope_theta=5e5, qkv_bias=False,
                        attn_out_bias=False, mlp="swiglu", mlp_bias=False, tied_head=False)),
    ]
    worst = 0.0
    for family, s in cases:
        for blocks, head in ((1, "none"), (s.n_layer, "none"), (s.n_layer, "lm_head")):
            model = make_model(s, blocks, head, torch.float64, seed=2)
            with torch.no_grad():  # non-trivial norms and biases, so that a misplaced one shows
                for name, p in model.named_parameters():
                    if name.endswith("bias") or ("ln" in name and name.endswith("weight")):
                        p.add_(0.1 * torch.randn_like(p))
            W = canonical_weights(model)
            x = torch.randn(2, 5, s.n_embd, dtype=torch.float64)
            if family == "gpt2":
                cfg = {"n_head": s.n_head, "layer_norm_epsilon": s.norm_eps}
                ref = lambda t: g2.gpt2(t, W, cfg, blocks, head, "embedding")
            else:
                setting = {"norm": s.norm, "eps": s.norm_eps, "theta": s.rope_theta, "rotary_dim": s.rotary_dim(),
                           "nh": s.n_head, "nkv": s.kv_heads(), "hd": s.head_size(), "mlp": s.mlp,
                           "residual": s.residual}
                W.setdefault("wte.weight", None)  # read (as a default) for an untied head; unused
                ref = lambda t: fam.canonical_model(t, W, setting, blocks, head, "embedding")
            xa = x.clone().requires_grad_(True)
            xb = x.clone().requires_grad_(True)
            out_a, out_b = model(xa), ref(xb)
            G = torch.randn_like(out_a)
            (ga,) = torch.autograd.grad(out_a, xa, G)
            (gb,) = torch.autograd.grad(out_b, xb, G)
            err = max(((out_a - out_b).norm() / out_b.norm()).item(), ((ga - gb).norm() / gb.norm()).item())
            worst = max(worst, err)
            print(f"check {family:<9} blocks {blocks} head {head:<8} relative difference {err:.2e}")
            if not err < 1e-12:
                raise SystemExit(f"peer_pytorch --check: {family} blocks {blocks} head {head} differs by {err:.2e}")
    # The l2 loss and its gradient as Metric::l2 defines them: gradient (o - t) / ||o - t||, 0 where o = t.
    o = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.cat([o.detach()[:1], torch.randn(2, 4, 5, dtype=torch.float64)])
    loss = l2_losses(o, t)
    (go,) = torch.autograd.grad(loss.sum(), o)
    expect = (o - t).detach() / loss.detach().clamp_min(1e-300).view(-1, 1, 1)
    expect[0] = 0
    if loss[0].item() != 0 or not torch.allclose(go, expect, rtol=1e-14, atol=0):
        raise SystemExit("peer_pytorch --check: the l2 loss or its gradient differs from Metric::l2")
    print(f"check passed: worst relative difference {worst:.2e}; the l2 loss and its gradient as Metric::l2")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="f32,f64", help="f32, f64, bf16 (default f32,f64, as lminv bench)")
    p.add_argument("--models", default="1block,12blocks,12blocks-lmhead",
                   help="1block, 12blocks, 12blocks-lmhead (GPT-2 of --n-layer blocks), pythia-160m[-lmhead], "
                        "tinyllama-1.1b[-lmhead]")
    p.add_argument("--batches", default="1,8,32", help="batch sizes")
    p.add_argument("--tokens", type=int, default=5, help="prompt length T")
    p.add_argument("--repeat", type=int, default=3, help="timed steps per cell after one warm-up (best counts)")
    p.add_argument("--n-layer", type=int, default=12, help="GPT-2 blocks (12: GPT-2 small)")
    p.add_argument("--n-embd", type=int, default=768, help="GPT-2 width")
    p.add_argument("--n-head", type=int, default=12, help="GPT-2 heads")
    p.add_argument("--vocab", type=int, default=50257, help="GPT-2 vocabulary")
    p.add_argument("--threads", type=thread_count, default=None,
                   help="torch.set_num_threads N (0: all cores); unset or 'default': torch's own start-up setting, "
                        "what a PyTorch user runs with")
    p.add_argument("--blas-threads", type=int, default=0,
                   help="set OpenBLAS's threads too (0: leave them as the library starts, as a PyTorch user does)")
    p.add_argument("--out", help="append JSON Lines records to FILE")
    p.add_argument("--check", action="store_true", help="check the module against tests/tools' models and exit")
    args = p.parse_args()
    if args.blas_threads < 0:
        raise SystemExit("peer_pytorch: --blas-threads must be >= 0")
    if args.check:
        check()
        return
    bench(args)


if __name__ == "__main__":
    main()
