#!/usr/bin/env python3
"""Golden values for lminv's gpt2 family, computed with PyTorch in float64.

Writes tests/data/gpt2-golden/ (or --out):
  checkpoint-f64/  config.json + model.safetensors (F64): a tiny random GPT-2 as a Hugging Face folder, tensor names
                   as GPT2LMHeadModel.save_pretrained writes them ("transformer.h.0.attn.c_attn.weight", ...; no
                   lm_head.weight, it is tied to transformer.wte.weight), metadata {"format": "pt"}
  checkpoint-f32/  the same weights rounded to float32 (F32)
  expected.safetensors  (F64) the inputs, and per case the output, a random output-space tensor G and the input
                   gradient of <G, output> (the vector-Jacobian product Model::backward(input, G))
  cases.json       the config, the token ids, and every case: its ModelSpec options and the names of its tensors

The model is written here from the architecture with Hugging Face GPT2LMHeadModel's exact semantics (eval mode):
token + position embedding; pre-LayerNorm blocks (ln_1 -> causal self-attention through Conv1D c_attn [d, 3d]
(y = x W + b), q|k|v split, heads of width d / n_head, scores / sqrt(head_dim), causal mask, softmax, c_proj;
residual; ln_2 -> MLP c_fc -> gelu_new (tanh approximation) -> c_proj; residual); ln_f; lm_head = wte^T (tied).
No `transformers` package is needed. The script checks its own model before it writes anything:
torch.autograd.gradcheck on a smaller model, and the forward pass against a second implementation built from torch's
own modules (nn.MultiheadAttention, F.layer_norm, F.gelu(approximate="tanh")).

lminv semantics of the cases (ModelSpec): input = embedding: the model input x [B, T, d] are token embeddings and the
model adds wpe[0:T]; input = vocab: x = v @ wte for v [B, T, V]. h_0 = x + wpe[0:T], h_i = block_{i-1}(h_{i-1}).
blocks = k: the main output is h_k; head ln_f: ln_f(h_k); head lm_head: ln_f(h_k) @ wte^T. layers = [l, ...]: h_l
(the raw residual stream, never ln_f) concatenated after the main output along the last dimension.
(Hugging Face's output_hidden_states differs at the last index: its hidden_states[n_layer] is ln_f(h_n_layer).)

The batch holds B = 2 items: item 0 is the token ids (embedding: their wte rows; vocab: one-hot rows), item 1 a fixed
random input. Values depend on torch's CPU generator; another torch version may draw other numbers, and the C++ test
only needs the committed files to agree with each other.

Usage: python3 tests/tools/make_gpt2_golden.py [--out DIR] [--check-only]
"""

import argparse
import json
import math
import os
import struct
import sys

import torch
import torch.nn.functional as F

CONFIG = {
    "n_layer": 3,
    "n_embd": 16,
    "n_head": 2,
    "vocab_size": 50,
    "n_positions": 16,
    "layer_norm_epsilon": 1e-5,
}
TOKEN_IDS = [31, 0, 49, 7, 12]  # T = 5; includes the first and the last row of wte
WEIGHT_SEED = 20240611
INPUT_SEED = 7
GRAD_SEED = 1000

WEIGHT_STD = 0.2  # rather than GPT-2's 0.02, so that softmax, gelu and LayerNorm are far from linear
BIAS_STD = 0.1
LN_STD = 0.2  # LayerNorm weights 1 + N(0, LN_STD^2), biases N(0, LN_STD^2)

CASE_BLOCKS = [0, 1, 3]
CASE_HEADS = ["none", "ln_f", "lm_head"]
CASE_INPUTS = ["embedding", "vocab"]
# (blocks, head, layers): extra block outputs concatenated after the main output. The first is the brief's case;
# the second concatenates d-wide layers (0 = the embeddings + positions) after a V-wide lm_head output.
MULTI_LAYER_CASES = [(2, "none", [1, 3]), (3, "lm_head", [0, 2])]


# ---- the model ---------------------------------------------------------------------------------------------------


def canonical_shapes(cfg):
    """lminv's canonical names (Hugging Face's without "transformer.") and shapes, Conv1D weights [in, out]."""
    d, V, P, L = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"], cfg["n_layer"]
    inner = 4 * d
    shapes = {"wte.weight": [V, d], "wpe.weight": [P, d]}
    for i in range(L):
        p = f"h.{i}."
        shapes[p + "ln_1.weight"] = [d]
        shapes[p + "ln_1.bias"] = [d]
        shapes[p + "attn.c_attn.weight"] = [d, 3 * d]
        shapes[p + "attn.c_attn.bias"] = [3 * d]
        shapes[p + "attn.c_proj.weight"] = [d, d]
        shapes[p + "attn.c_proj.bias"] = [d]
        shapes[p + "ln_2.weight"] = [d]
        shapes[p + "ln_2.bias"] = [d]
        shapes[p + "mlp.c_fc.weight"] = [d, inner]
        shapes[p + "mlp.c_fc.bias"] = [inner]
        shapes[p + "mlp.c_proj.weight"] = [inner, d]
        shapes[p + "mlp.c_proj.bias"] = [d]
    shapes["ln_f.weight"] = [d]
    shapes["ln_f.bias"] = [d]
    return shapes


def random_weights(cfg, seed):
    """Every tensor drawn in the order of canonical_shapes from one seeded generator, in float64."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in canonical_shapes(cfg).items():
        z = torch.randn(shape, generator=g, dtype=torch.float64)
        if ".ln_" in name or name.startswith("ln_f."):
            weights[name] = (1.0 + LN_STD * z) if name.endswith(".weight") else LN_STD * z
        elif name.endswith(".bias"):
            weights[name] = BIAS_STD * z
        else:
            weights[name] = WEIGHT_STD * z
    return weights


def layer_norm(x, w, b, eps):
    """torch.nn.LayerNorm: biased variance, eps inside the square root."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def gelu_new(x):
    """transformers' NewGELUActivation ("gelu_new"), the tanh approximation."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def conv1d(x, w, b):
    """transformers' Conv1D: y = x @ W + b with W [in, out]."""
    return x @ w + b


def attention(x, W, p, cfg):
    """GPT2Attention._attn in eval mode, scale_attn_weights on, no layer-index scaling, no upcast/reorder."""
    B, T, d = x.shape
    nh = cfg["n_head"]
    hd = d // nh
    qkv = conv1d(x, W[p + "attn.c_attn.weight"], W[p + "attn.c_attn.bias"])
    q, k, v = qkv.split(d, dim=2)

    def split_heads(t):  # [B, T, d] -> [B, nh, T, hd]: head j is columns [j hd, (j+1) hd)
        return t.view(B, T, nh, hd).permute(0, 2, 1, 3)

    q, k, v = split_heads(q), split_heads(k), split_heads(v)
    scores = torch.matmul(q, k.transpose(-1, -2))
    scores = scores / torch.full([], v.size(-1) ** 0.5, dtype=scores.dtype)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool)).view(1, 1, T, T)
    mask_value = torch.full([], torch.finfo(scores.dtype).min, dtype=scores.dtype)
    scores = torch.where(causal, scores, mask_value)
    probs = F.softmax(scores, dim=-1)
    out = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous().view(B, T, d)
    return conv1d(out, W[p + "attn.c_proj.weight"], W[p + "attn.c_proj.bias"])


def block(h, W, i, cfg):
    """GPT2Block: pre-LayerNorm attention and MLP with residuals."""
    p = f"h.{i}."
    eps = cfg["layer_norm_epsilon"]
    h = h + attention(layer_norm(h, W[p + "ln_1.weight"], W[p + "ln_1.bias"], eps), W, p, cfg)
    m = layer_norm(h, W[p + "ln_2.weight"], W[p + "ln_2.bias"], eps)
    m = conv1d(gelu_new(conv1d(m, W[p + "mlp.c_fc.weight"], W[p + "mlp.c_fc.bias"])),
               W[p + "mlp.c_proj.weight"], W[p + "mlp.c_proj.bias"])
    return h + m


def gpt2(x_in, W, cfg, blocks, head, input_space, layers=(), block_fn=block, ln_fn=layer_norm):
    """lminv's gpt2 Model.forward on a batch [B, T, d] (embedding) or [B, T, V] (vocab)."""
    x = x_in @ W["wte.weight"] if input_space == "vocab" else x_in
    T = x.shape[1]
    h = x + W["wpe.weight"][:T]
    states = [h]
    for i in range(max([blocks] + list(layers))):
        h = block_fn(h, W, i, cfg)
        states.append(h)
    out = states[blocks]
    if head in ("ln_f", "lm_head"):
        out = ln_fn(out, W["ln_f.weight"], W["ln_f.bias"], cfg["layer_norm_epsilon"])
    if head == "lm_head":
        out = out @ W["wte.weight"].t()  # tied lm_head, no bias
    if layers:
        out = torch.cat([out] + [states[l] for l in layers], dim=-1)
    return out


def vjp(x_in, G, W, cfg, **spec):
    """(output, d<G, output>/d input)."""
    x = x_in.clone().requires_grad_(True)
    out = gpt2(x, W, cfg, **spec)
    (grad,) = torch.autograd.grad(out, x, grad_outputs=G)
    return out.detach(), grad


# ---- self-checks ---------------------------------------------------------------------------------------------------


def block_from_torch_modules(h, W, i, cfg):
    """The same block from torch's own pieces: nn.MultiheadAttention (in_proj = c_attn^T), F.layer_norm, F.gelu(tanh)."""
    p = f"h.{i}."
    d, nh, eps = cfg["n_embd"], cfg["n_head"], cfg["layer_norm_epsilon"]
    T = h.shape[1]
    mha = torch.nn.MultiheadAttention(d, nh, bias=True, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        mha.in_proj_weight.copy_(W[p + "attn.c_attn.weight"].t())
        mha.in_proj_bias.copy_(W[p + "attn.c_attn.bias"])
        mha.out_proj.weight.copy_(W[p + "attn.c_proj.weight"].t())
        mha.out_proj.bias.copy_(W[p + "attn.c_proj.bias"])
    mha.eval()
    a = F.layer_norm(h, (d,), W[p + "ln_1.weight"], W[p + "ln_1.bias"], eps)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)  # True = may not attend
    h = h + mha(a, a, a, attn_mask=future, need_weights=False)[0]
    m = F.layer_norm(h, (d,), W[p + "ln_2.weight"], W[p + "ln_2.bias"], eps)
    m = F.linear(m, W[p + "mlp.c_fc.weight"].t(), W[p + "mlp.c_fc.bias"])
    m = F.gelu(m, approximate="tanh")
    m = F.linear(m, W[p + "mlp.c_proj.weight"].t(), W[p + "mlp.c_proj.bias"])
    return h + m


def torch_layer_norm(x, w, b, eps):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def self_check():
    # 1. Against a second implementation from torch modules, on the golden config.
    cfg = CONFIG
    W = random_weights(cfg, WEIGHT_SEED)
    g = torch.Generator().manual_seed(123)
    T = len(TOKEN_IDS)
    for input_space in CASE_INPUTS:
        width = cfg["n_embd"] if input_space == "embedding" else cfg["vocab_size"]
        x = torch.randn(3, T, width, generator=g, dtype=torch.float64) * 0.3
        for blocks in range(cfg["n_layer"] + 1):
            for head in CASE_HEADS:
                with torch.no_grad():
                    a = gpt2(x, W, cfg, blocks, head, input_space)
                    b = gpt2(x, W, cfg, blocks, head, input_space, block_fn=block_from_torch_modules,
                             ln_fn=torch_layer_norm)
                err = (a - b).abs().max().item() / b.abs().max().item()
                if not err < 1e-12:
                    raise SystemExit(f"self-check: torch-module model differs by {err} (k={blocks} {head} {input_space})")
    # Batch items are independent; causality: output position t depends on inputs <= t only.
    x = torch.randn(2, T, cfg["n_embd"], generator=g, dtype=torch.float64)
    with torch.no_grad():
        full = gpt2(x, W, cfg, 3, "lm_head", "embedding")
        one = gpt2(x[1:], W, cfg, 3, "lm_head", "embedding")
        prefix = gpt2(x[:, :3], W, cfg, 3, "lm_head", "embedding")
    if not torch.allclose(full[1:], one, rtol=0, atol=1e-13) or not torch.allclose(full[:, :3], prefix, rtol=0,
                                                                                   atol=1e-13):
        raise SystemExit("self-check: batch items or causal prefix disagree")

    # 2. Input gradients against finite differences (torch.autograd.gradcheck, fp64) on a smaller model.
    small = {"n_layer": 2, "n_embd": 8, "n_head": 2, "vocab_size": 11, "n_positions": 6, "layer_norm_epsilon": 1e-5}
    Ws = random_weights(small, 99)
    g = torch.Generator().manual_seed(5)
    specs = [(k, h, i, []) for k in (0, 1, 2) for h in CASE_HEADS for i in CASE_INPUTS]
    specs += [(1, "none", "embedding", [0, 2]), (2, "lm_head", "vocab", [1])]
    for blocks, head, input_space, layers in specs:
        width = small["n_embd"] if input_space == "embedding" else small["vocab_size"]
        x = (torch.randn(2, 3, width, generator=g, dtype=torch.float64) * 0.5).requires_grad_(True)
        ok = torch.autograd.gradcheck(lambda t: gpt2(t, Ws, small, blocks, head, input_space, layers), (x,),
                                      eps=1e-6, atol=1e-7, rtol=1e-5)
        if not ok:
            raise SystemExit(f"self-check: gradcheck failed (k={blocks} {head} {input_space} {layers})")
    print("self-check: torch-module model agrees (< 1e-12), gradcheck passes on "
          f"{len(specs)} small specs", file=sys.stderr)


# ---- files ---------------------------------------------------------------------------------------------------------

DTYPES = {torch.float64: ("F64", "<f8"), torch.float32: ("F32", "<f4")}


def write_safetensors(path, tensors, metadata):
    """safetensors: u64 LE header length, JSON header ("__metadata__" first, then tensors in data order), data.
    The header is padded with spaces to a multiple of 8 bytes; tensors follow each other in name order, no gaps."""
    header = {"__metadata__": dict(metadata)} if metadata else {}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        dtype, np_dtype = DTYPES[t.dtype]
        blob = t.numpy().astype(np_dtype, copy=False).tobytes()
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    tmp = str(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)


def read_safetensors(path):
    """Reads back what write_safetensors wrote (a check of the writer)."""
    import numpy as np

    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    base = 8 + n
    out = {}
    for name, e in header.items():
        np_dtype = {"F64": "<f8", "F32": "<f4"}[e["dtype"]]
        begin, end = e["data_offsets"]
        out[name] = torch.from_numpy(np.frombuffer(data[base + begin:base + end], dtype=np_dtype).copy()).view(
            e["shape"])
    return out, meta


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def hf_config(cfg, torch_dtype):
    """config.json as transformers' GPT2Config writes it (the fields lminv reads, and GPT2Config's defaults)."""
    return {
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1,
        "bos_token_id": cfg["vocab_size"] - 1,
        "embd_pdrop": 0.1,
        "eos_token_id": cfg["vocab_size"] - 1,
        "initializer_range": 0.02,
        "layer_norm_epsilon": cfg["layer_norm_epsilon"],
        "model_type": "gpt2",
        "n_embd": cfg["n_embd"],
        "n_head": cfg["n_head"],
        "n_inner": None,
        "n_layer": cfg["n_layer"],
        "n_positions": cfg["n_positions"],
        "reorder_and_upcast_attn": False,
        "resid_pdrop": 0.1,
        "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "tie_word_embeddings": True,
        "torch_dtype": torch_dtype,
        "use_cache": True,
        "vocab_size": cfg["vocab_size"],
    }


def write_checkpoint(folder, W, dtype):
    os.makedirs(folder, exist_ok=True)
    tensors = {"transformer." + name: t.to(dtype) for name, t in W.items()}
    write_safetensors(os.path.join(folder, "model.safetensors"), tensors, {"format": "pt"})
    write_json(os.path.join(folder, "config.json"), hf_config(CONFIG, "float64" if dtype == torch.float64 else "float32"))
    back, meta = read_safetensors(os.path.join(folder, "model.safetensors"))
    assert meta == {"format": "pt"} and back.keys() == tensors.keys()
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)


def case_name(blocks, head, input_space, layers):
    name = f"k{blocks}_{head}_{input_space}"
    if layers:
        name += "_layers" + "_".join(str(l) for l in layers)
    return name


def make_fixture(out_dir):
    cfg = CONFIG
    d, V = cfg["n_embd"], cfg["vocab_size"]
    T = len(TOKEN_IDS)
    W = random_weights(cfg, WEIGHT_SEED)
    write_checkpoint(os.path.join(out_dir, "checkpoint-f64"), W, torch.float64)
    write_checkpoint(os.path.join(out_dir, "checkpoint-f32"), W, torch.float32)

    ids = torch.tensor(TOKEN_IDS)
    g = torch.Generator().manual_seed(INPUT_SEED)
    random_embedding = WEIGHT_STD * torch.randn(T, d, generator=g, dtype=torch.float64)
    random_vocab = 0.3 * torch.randn(T, V, generator=g, dtype=torch.float64)
    inputs = {
        "embedding": torch.stack([W["wte.weight"][ids], random_embedding]),
        "vocab": torch.stack([F.one_hot(ids, V).to(torch.float64), random_vocab]),
    }
    expected = {"input/" + k: v for k, v in inputs.items()}

    specs = [(k, h, i, []) for k in CASE_BLOCKS for h in CASE_HEADS for i in CASE_INPUTS]
    specs += [(k, h, i, layers) for (k, h, layers) in MULTI_LAYER_CASES for i in CASE_INPUTS]
    cases = []
    for n, (blocks, head, input_space, layers) in enumerate(specs):
        name = case_name(blocks, head, input_space, layers)
        x = inputs[input_space]
        with torch.no_grad():
            shape = gpt2(x, W, cfg, blocks, head, input_space, layers).shape
        G = torch.randn(shape, generator=torch.Generator().manual_seed(GRAD_SEED + n), dtype=torch.float64)
        out, grad = vjp(x, G, W, cfg, blocks=blocks, head=head, input_space=input_space, layers=layers)
        prefix = f"case/{name}/"
        expected[prefix + "output"] = out
        expected[prefix + "grad_output"] = G
        expected[prefix + "grad_input"] = grad
        cases.append({
            "name": name,
            "blocks": blocks,
            "head": head,
            "input": input_space,
            "layers": layers,
            "input_tensor": "input/" + input_space,
            "output": prefix + "output",
            "grad_output": prefix + "grad_output",
            "grad_input": prefix + "grad_input",
            "output_shape": list(out.shape),
        })

    metadata = {
        "generator": "tests/tools/make_gpt2_golden.py",
        "torch_version": torch.__version__.split("+")[0],
        "token_ids": " ".join(str(i) for i in TOKEN_IDS),
        "cases": " ".join(c["name"] for c in cases),
    }
    for c in cases:
        metadata["case/" + c["name"]] = (f"blocks={c['blocks']} head={c['head']} input={c['input']} "
                                         f"layers={','.join(str(l) for l in c['layers'])}")
    write_safetensors(os.path.join(out_dir, "expected.safetensors"), expected, metadata)
    back, meta = read_safetensors(os.path.join(out_dir, "expected.safetensors"))
    assert meta == metadata and all(torch.equal(back[k], expected[k]) for k in expected)

    write_json(os.path.join(out_dir, "cases.json"), {
        "description": "GPT-2 golden values from PyTorch (float64); see tests/tools/README.md",
        "config": cfg,
        "checkpoints": {"f64": "checkpoint-f64", "f32": "checkpoint-f32"},
        "expected": "expected.safetensors",
        "token_ids": TOKEN_IDS,
        "seq_len": T,
        "batch": 2,
        "batch_items": ["the token ids: their wte rows (embedding) or one-hot rows (vocab)",
                        "a fixed random input: N(0, 0.2^2) embeddings or N(0, 0.3^2) vocab-space rows"],
        "inputs": {k: "input/" + k for k in inputs},
        "cases": cases,
    })
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(out_dir) for f in files)
    print(f"wrote {len(cases)} cases to {out_dir} ({size} bytes)", file=sys.stderr)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(here, "..", "data", "gpt2-golden"))
    parser.add_argument("--check-only", action="store_true", help="run the self-checks and write nothing")
    args = parser.parse_args()
    torch.set_num_threads(1)  # reduction order, hence the last bits, independent of the machine's core count
    self_check()
    if not args.check_only:
        os.makedirs(args.out, exist_ok=True)
        make_fixture(os.path.normpath(args.out))


if __name__ == "__main__":
    main()
