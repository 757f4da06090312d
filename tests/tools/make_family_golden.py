#!/usr/bin/env python3
"""Golden values for lminv's decoder families (llama, qwen2, mistral, gpt_neox), computed with PyTorch.

Writes tests/data/family-golden/ (or --out):
  manifest.json          every folder: its family, how its tensors are stored, which golden file it answers to, and
                         the lminv setting (ModelSpec sizes and Architecture fields) its config.json must load as
  <family>/config.json   a Hugging Face config as the family's config class writes it
  <family>/model.safetensors   F32, Hugging Face's tensor names and layouts (nn.Linear [out, in]), {"format": "pt"}
  <family>/golden.safetensors  inputs, and per case the output and the input gradient in float64 and float32
  llama-sharded/         the llama weights again, in two shards with model.safetensors.index.json
  mistral-bf16/          the mistral weights stored as BF16 (they are drawn bf16-exact, so nothing is lost)
  gpt_neox-f16/          the gpt_neox weights stored as F16 (drawn f16-exact), plus the rotary inv_freq buffers that
                         older GPT-NeoX checkpoints (Pythia) carry, which a loader must skip
The three extra folders have no golden file of their own: they load to the same values as their family's folder.

The models are written here, small and plain, from Hugging Face's modeling files (no `transformers` package needed):
  LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM: embed_tokens; per layer x + o_proj(attn(RMSNorm(x))),
    then x + down_proj(silu(gate_proj(y)) * up_proj(y)) with y = RMSNorm(x); RMSNorm(x) = w * x / sqrt(mean(x^2) + eps);
    q_proj/k_proj/v_proj separate nn.Linear weights [out, in], num_key_value_heads kv heads repeated to the query heads
    (repeat_kv: query head j reads kv head j // (n_head / n_kv)); head_dim from config (Mistral-Nemo style) or
    hidden_size / heads; rotary on the whole head with rotate_half; scores * head_dim^-0.5; causal softmax; norm;
    lm_head (tie_word_embeddings: the lm_head is embed_tokens). Qwen2 has a bias on q, k and v (not on o).
  GPTNeoXForCausalLM: embed_in; per layer (use_parallel_residual) x + attention(LN1(x)) + mlp(LN2(x)), LayerNorm with
    bias; the fused query_key_value [3 d, d] read as view(..., n_head, 3 * head_size), i.e. its rows are head by head
    [h0: q k v | h1: q k v | ...]; rotary on the first rotary_ndims = int(head_size * rotary_pct) features of each head,
    base rotary_emb_base; dense; dense_h_to_4h -> gelu (erf) -> dense_4h_to_h; final_layer_norm; embed_out (untied).

Two deliberate differences from running transformers on these weights: every computation is done in the requested
dtype throughout (Hugging Face's RMSNorm and softmax cast to float32 and its rotary tables are made in float32, which
would cap a float64 run at float32 accuracy), and the rotary tables are made in float64 (then rounded to the dtype).
That is lminv's definition of the architecture (sdk/include/lminv/architecture.hpp), and what a float64 backend
must reproduce to 1e-10.

What a case "blocks=k head=H input=I layers=L" means (lminv's ModelSpec, docs/architecture.md): the model input x is
[B, T, d] token embeddings (input=embedding) or [B, T, V] vocabulary-space rows multiplied by the token embedding
(input=vocab: x = v @ embed_tokens). These families have no learned positions, so h_0 = x, and h_i is the residual
stream after block i. The output is h_k (head=none), the final norm of it (head=ln_f: model.norm /
final_layer_norm), or the logits lm_head(norm(h_k)) (head=lm_head). layers=l1,l2 appends h_l1, h_l2 (raw residual
streams, never normed) along the last dimension; the model runs max(k, layers) blocks.

Per case the golden file holds, under case/NAME/: grad_output (G, random, f32-exact, stored F64), and for dtype in
f64, f32: DTYPE/output and DTYPE/grad_input, the gradient of <G, output> with respect to the input. The f64 values
come from the stored weights converted to float64 (exact: they are f32 values), the f32 values from a float32 run on
the same weights and inputs (stored F32). The inputs (input/embedding, input/vocab, stored F64) are f32-exact too, so
a float32 and a float64 backend see the same numbers. Batch item 0 is the token ids (their embedding rows, or one-hot
rows for input=vocab), item 1 a fixed random input (random embeddings, or random softmax rows for input=vocab).

Before writing anything the script checks its own models (--check-only runs only this):
  - each family against a second implementation written from lminv's architecture.hpp on lminv's canonical layout
    (fused c_attn [d, q|k|v] in [in, out] layout, explicit per-feature rotary formula, explicit kv-head index j // g),
    after converting the Hugging Face tensors the way a loader must: agreement to 1e-12 on every case;
  - grouped kv heads: a GQA model equals the model whose k/v weights are repeated to one kv head per query head;
  - rotary: the score of a query at position m and a key at n depends on n - m only;
  - batch items are independent and position t depends on positions <= t only (prefixes of the sequence);
  - torch.autograd.gradcheck of the input gradient of every family, for a head of each kind and a layers case;
  - the float32 golden values lie within 1e-5 of the float64 ones (so a 1e-4 tolerance for f32 backends is fair).
The output is deterministic (one torch thread, no timestamps). Another torch version may draw other random numbers;
that is harmless as long as the whole folder is committed together.

Usage: python3 -B tests/tools/make_family_golden.py [--out DIR] [--check-only]
"""

import argparse
import json
import math
import os
import struct
import sys

import torch
import torch.nn.functional as F

TOKEN_IDS = [5, 0, 17, 42, 9]  # T = 5; within every fixture's vocabulary
BATCH = 2
SEED = 20250110

WEIGHT_STD = 0.2  # linear layers and embeddings: large enough that softmax, silu/gelu and the norms are not linear
BIAS_STD = 0.1
NORM_STD = 0.2  # norm weights 1 + N(0, NORM_STD^2), LayerNorm biases N(0, NORM_STD^2)
EMBED_STD = 0.5

# The fixtures: a Hugging Face config (as the family's config class writes it, with non-default values where a loader
# could silently fall back to a default), the dtype the weights are drawn exact in, and the lminv setting the config
# stands for. n_positions is 32 everywhere.
FIXTURES = [
    {
        "name": "llama",
        "exact_in": "f32",
        "config": {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": 32,
            "intermediate_size": 80,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 64,
            "max_position_embeddings": 32,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": None,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "pretraining_tp": 1,
            "tie_word_embeddings": False,
            "initializer_range": 0.02,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "use_cache": True,
        },
        "lminv": {"n_layer": 3, "n_embd": 32, "n_head": 4, "n_inner": 80, "vocab_size": 64, "n_positions": 32,
                  "norm": "rms_norm", "norm_bias": False, "norm_eps": 1e-5, "positions": "rotary",
                  "rope_theta": 500000.0, "rotary_dim": 8, "kv_heads": 2, "head_size": 8, "qkv_bias": False,
                  "attn_out_bias": False, "mlp": "swiglu", "mlp_bias": False, "residual": "sequential",
                  "tied_head": False},
    },
    {
        "name": "qwen2",
        "exact_in": "f32",
        "config": {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 72,
            "max_position_embeddings": 32,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "rope_scaling": None,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "sliding_window": 4096,
            "max_window_layers": 2,
            "tie_word_embeddings": True,
            "initializer_range": 0.02,
            "bos_token_id": 70,
            "eos_token_id": 71,
            "use_cache": True,
        },
        "lminv": {"n_layer": 2, "n_embd": 32, "n_head": 4, "n_inner": 64, "vocab_size": 72, "n_positions": 32,
                  "norm": "rms_norm", "norm_bias": False, "norm_eps": 1e-6, "positions": "rotary",
                  "rope_theta": 1000000.0, "rotary_dim": 8, "kv_heads": 2, "head_size": 8, "qkv_bias": True,
                  "attn_out_bias": False, "mlp": "swiglu", "mlp_bias": False, "residual": "sequential",
                  "tied_head": True},
    },
    {
        # Mistral with an explicit head_dim (as Mistral-Nemo has): 4 query heads of 16 features on d = 32, 2 kv heads.
        "name": "mistral",
        "exact_in": "bf16",
        "config": {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "vocab_size": 56,
            "max_position_embeddings": 32,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1000000.0,
            "sliding_window": 4096,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
            "initializer_range": 0.02,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "use_cache": True,
        },
        "lminv": {"n_layer": 2, "n_embd": 32, "n_head": 4, "n_inner": 64, "vocab_size": 56, "n_positions": 32,
                  "norm": "rms_norm", "norm_bias": False, "norm_eps": 1e-5, "positions": "rotary",
                  "rope_theta": 1000000.0, "rotary_dim": 16, "kv_heads": 2, "head_size": 16, "qkv_bias": False,
                  "attn_out_bias": False, "mlp": "swiglu", "mlp_bias": False, "residual": "sequential",
                  "tied_head": False},
    },
    {
        # Pythia-style GPT-NeoX: head_size 16, rotary_pct 0.25 (rotary_ndims 4), parallel residual, untied embed_out.
        "name": "gpt_neox",
        "exact_in": "f16",
        "config": {
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
            "hidden_size": 32,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "vocab_size": 60,
            "max_position_embeddings": 32,
            "layer_norm_eps": 1e-5,
            "rotary_pct": 0.25,
            "rotary_emb_base": 25000,
            "rope_scaling": None,
            "attention_bias": True,
            "use_parallel_residual": True,
            "hidden_act": "gelu",
            "tie_word_embeddings": False,
            "attention_dropout": 0.0,
            "hidden_dropout": 0.0,
            "classifier_dropout": 0.1,
            "initializer_range": 0.02,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "use_cache": True,
        },
        "lminv": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_inner": 96, "vocab_size": 60, "n_positions": 32,
                  "norm": "layer_norm", "norm_bias": True, "norm_eps": 1e-5, "positions": "rotary",
                  "rope_theta": 25000.0, "rotary_dim": 4, "kv_heads": 2, "head_size": 16, "qkv_bias": True,
                  "attn_out_bias": True, "mlp": "gelu_erf", "mlp_bias": True, "residual": "parallel",
                  "tied_head": False},
    },
]

# Extra folders: same weights as a fixture, stored another way.
VARIANTS = [
    {"folder": "llama-sharded", "of": "llama", "store": "F32", "shards": 2},
    {"folder": "mistral-bf16", "of": "mistral", "store": "BF16", "shards": 1},
    {"folder": "gpt_neox-f16", "of": "gpt_neox", "store": "F16", "shards": 1, "inv_freq_buffers": True},
]


def cases_for(n_layer):
    """(blocks, head, input, layers) of every case; L = n_layer."""
    L = n_layer
    return [
        (1, "none", "embedding", []),
        (0, "ln_f", "embedding", []),  # the final norm alone
        (L, "ln_f", "embedding", []),
        (1, "lm_head", "embedding", []),
        (L, "lm_head", "embedding", []),
        (L, "lm_head", "vocab", []),
        (1, "none", "embedding", [0, L]),  # [B, T, 3 d]: h_1, then h_0 and h_L
    ]


def case_name(blocks, head, input_space, layers):
    name = f"k{blocks}_{head}_{input_space}"
    if layers:
        name += "_layers" + "_".join(str(l) for l in layers)
    return name


def case_spec_string(blocks, head, input_space, layers):
    return f"blocks={blocks} head={head} input={input_space} layers={','.join(str(l) for l in layers)}"


# ---- the Hugging Face models, on Hugging Face's tensor names and layouts ----------------------------------------


def cfg_heads(c):
    nh = c["num_attention_heads"]
    nkv = c.get("num_key_value_heads") or nh
    hd = c.get("head_dim") or c["hidden_size"] // nh
    return nh, nkv, hd


def is_neox(c):
    return c["model_type"] == "gpt_neox"


def hf_shapes(c):
    """Every stored tensor of the checkpoint, in a fixed order: name -> shape (nn.Linear weights [out, in])."""
    d, V, L, inner = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"], c["intermediate_size"]
    nh, nkv, hd = cfg_heads(c)
    s = {}
    if is_neox(c):
        s["gpt_neox.embed_in.weight"] = [V, d]
        for i in range(L):
            p = f"gpt_neox.layers.{i}."
            for ln in ("input_layernorm", "post_attention_layernorm"):
                s[p + ln + ".weight"] = [d]
                s[p + ln + ".bias"] = [d]
            s[p + "attention.query_key_value.weight"] = [3 * d, d]
            s[p + "attention.query_key_value.bias"] = [3 * d]
            s[p + "attention.dense.weight"] = [d, d]
            s[p + "attention.dense.bias"] = [d]
            s[p + "mlp.dense_h_to_4h.weight"] = [inner, d]
            s[p + "mlp.dense_h_to_4h.bias"] = [inner]
            s[p + "mlp.dense_4h_to_h.weight"] = [d, inner]
            s[p + "mlp.dense_4h_to_h.bias"] = [d]
        s["gpt_neox.final_layer_norm.weight"] = [d]
        s["gpt_neox.final_layer_norm.bias"] = [d]
        if not c.get("tie_word_embeddings", False):
            s["embed_out.weight"] = [V, d]
        return s
    qkv_bias = c["model_type"] == "qwen2" or c.get("attention_bias", False)
    o_bias = c["model_type"] == "llama" and c.get("attention_bias", False)
    mlp_bias = c["model_type"] == "llama" and c.get("mlp_bias", False)
    s["model.embed_tokens.weight"] = [V, d]
    for i in range(L):
        p = f"model.layers.{i}."
        s[p + "input_layernorm.weight"] = [d]
        for proj, rows in (("q_proj", nh * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)):
            s[p + "self_attn." + proj + ".weight"] = [rows, d]
            if qkv_bias:
                s[p + "self_attn." + proj + ".bias"] = [rows]
        s[p + "self_attn.o_proj.weight"] = [d, nh * hd]
        if o_bias:
            s[p + "self_attn.o_proj.bias"] = [d]
        s[p + "post_attention_layernorm.weight"] = [d]
        for proj, shape in (("gate_proj", [inner, d]), ("up_proj", [inner, d]), ("down_proj", [d, inner])):
            s[p + "mlp." + proj + ".weight"] = shape
            if mlp_bias:
                s[p + "mlp." + proj + ".bias"] = [shape[0]]
    s["model.norm.weight"] = [d]
    if not c.get("tie_word_embeddings", False):
        s["lm_head.weight"] = [V, d]
    return s


ROUND = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def random_weights(c, seed, exact_in):
    """Every tensor from one seeded generator, in hf_shapes order, rounded to `exact_in` and held in float64."""
    g = torch.Generator().manual_seed(seed)
    W = {}
    for name, shape in hf_shapes(c).items():
        z = torch.randn(shape, generator=g, dtype=torch.float64)
        if "layernorm" in name or "layer_norm" in name or name == "model.norm.weight":
            t = (1.0 + NORM_STD * z) if name.endswith(".weight") else NORM_STD * z
        elif name.endswith(".bias"):
            t = BIAS_STD * z
        elif "embed" in name or name == "lm_head.weight":
            t = EMBED_STD * z
        else:
            t = WEIGHT_STD * z
        W[name] = t.to(ROUND[exact_in]).to(torch.float64)
    return W


def linear(x, W, name):
    """nn.Linear: x W^T + b, the bias when the checkpoint has one."""
    y = x @ W[name + ".weight"].t()
    if name + ".bias" in W:
        y = y + W[name + ".bias"]
    return y


def rms_norm(x, w, eps):
    return w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def rotary_tables(dim, T, base, dtype):
    """cos, sin [T, dim] as Hugging Face's rotary embedding makes them (cat(freqs, freqs)), in float64 first."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x, cos, sin):
    """x [B, heads, T, dim]."""
    return x * cos + rotate_half(x) * sin


def repeat_kv(x, n_rep):
    """[B, n_kv, T, hd] -> [B, n_kv * n_rep, T, hd], each kv head repeated n_rep times in place."""
    B, nkv, T, hd = x.shape
    return x[:, :, None, :, :].expand(B, nkv, n_rep, T, hd).reshape(B, nkv * n_rep, T, hd)


def causal_softmax(scores):
    T = scores.shape[-1]
    allowed = torch.tril(torch.ones(T, T, dtype=torch.bool))
    scores = torch.where(allowed, scores, torch.tensor(torch.finfo(scores.dtype).min, dtype=scores.dtype))
    return F.softmax(scores, dim=-1)


def llama_attention(x, W, p, c, cos, sin):
    B, T, _ = x.shape
    nh, nkv, hd = cfg_heads(c)
    q = linear(x, W, p + "q_proj").view(B, T, nh, hd).transpose(1, 2)
    k = linear(x, W, p + "k_proj").view(B, T, nkv, hd).transpose(1, 2)
    v = linear(x, W, p + "v_proj").view(B, T, nkv, hd).transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k, v = repeat_kv(k, nh // nkv), repeat_kv(v, nh // nkv)
    probs = causal_softmax((q @ k.transpose(2, 3)) * hd ** -0.5)
    out = (probs @ v).transpose(1, 2).reshape(B, T, nh * hd)
    return linear(out, W, p + "o_proj")


def llama_layer(h, W, i, c, cos, sin):
    p = f"model.layers.{i}."
    eps = c["rms_norm_eps"]
    h = h + llama_attention(rms_norm(h, W[p + "input_layernorm.weight"], eps), W, p + "self_attn.", c, cos, sin)
    y = rms_norm(h, W[p + "post_attention_layernorm.weight"], eps)
    m = p + "mlp."
    return h + linear(F.silu(linear(y, W, m + "gate_proj")) * linear(y, W, m + "up_proj"), W, m + "down_proj")


def neox_attention(x, W, p, c, cos, sin):
    B, T, d = x.shape
    nh = c["num_attention_heads"]
    hs = d // nh
    r = int(hs * c["rotary_pct"])
    qkv = linear(x, W, p + "query_key_value").view(B, T, nh, 3 * hs)  # per head: [q k v]
    q = qkv[..., :hs].permute(0, 2, 1, 3)
    k = qkv[..., hs:2 * hs].permute(0, 2, 1, 3)
    v = qkv[..., 2 * hs:].permute(0, 2, 1, 3)
    q = torch.cat((apply_rotary(q[..., :r], cos, sin), q[..., r:]), dim=-1)
    k = torch.cat((apply_rotary(k[..., :r], cos, sin), k[..., r:]), dim=-1)
    probs = causal_softmax((q @ k.transpose(-1, -2)) * hs ** -0.5)
    out = (probs @ v).permute(0, 2, 1, 3).reshape(B, T, d)
    return linear(out, W, p + "dense")


def neox_layer(h, W, i, c, cos, sin):
    p = f"gpt_neox.layers.{i}."
    eps = c["layer_norm_eps"]

    def ln(x, name):
        return layer_norm(x, W[p + name + ".weight"], W[p + name + ".bias"], eps)

    def mlp(x):
        return linear(F.gelu(linear(x, W, p + "mlp.dense_h_to_4h")), W, p + "mlp.dense_4h_to_h")

    attn = neox_attention(ln(h, "input_layernorm"), W, p + "attention.", c, cos, sin)
    if c["use_parallel_residual"]:
        return mlp(ln(h, "post_attention_layernorm")) + attn + h
    a = attn + h
    return mlp(ln(a, "post_attention_layernorm")) + a


def hf_model(x_in, W, c, blocks, head, input_space, layers=()):
    """lminv's Model.forward (see the module docstring) with Hugging Face's modules and tensors."""
    dtype = x_in.dtype
    if is_neox(c):
        embed, layer = W["gpt_neox.embed_in.weight"], neox_layer
        rdim = int((c["hidden_size"] // c["num_attention_heads"]) * c["rotary_pct"])
        base = c["rotary_emb_base"]
        lm_head = W["embed_out.weight"] if "embed_out.weight" in W else embed

        def final_norm(x):
            return layer_norm(x, W["gpt_neox.final_layer_norm.weight"], W["gpt_neox.final_layer_norm.bias"],
                              c["layer_norm_eps"])
    else:
        embed, layer = W["model.embed_tokens.weight"], llama_layer
        rdim = cfg_heads(c)[2]
        base = c["rope_theta"]
        lm_head = W["lm_head.weight"] if "lm_head.weight" in W else embed

        def final_norm(x):
            return rms_norm(x, W["model.norm.weight"], c["rms_norm_eps"])

    x = x_in @ embed if input_space == "vocab" else x_in
    cos, sin = rotary_tables(rdim, x.shape[1], base, dtype)
    states = [x]
    h = x
    for i in range(max([blocks] + list(layers))):
        h = layer(h, W, i, c, cos, sin)
        states.append(h)
    out = states[blocks]
    if head in ("ln_f", "lm_head"):
        out = final_norm(out)
    if head == "lm_head":
        out = out @ lm_head.t()
    if layers:
        out = torch.cat([out] + [states[l] for l in layers], dim=-1)
    return out


def vjp(x_in, G, W, c, **case):
    """(output, d<G, output>/d input)."""
    x = x_in.detach().clone().requires_grad_(True)
    out = hf_model(x, W, c, **case)
    (grad,) = torch.autograd.grad(out, x, grad_outputs=G)
    return out.detach(), grad


# ---- a second implementation: lminv's canonical layout and architecture.hpp's formulas ------------------------


def lminv_setting(c):
    """The Architecture fields (and sizes) a config stands for, as architecture.hpp names them."""
    nh, nkv, hd = cfg_heads(c)
    if is_neox(c):
        return {"norm": "layer_norm", "eps": c["layer_norm_eps"], "theta": float(c["rotary_emb_base"]),
                "rotary_dim": int(hd * c["rotary_pct"]) // 2 * 2, "nh": nh, "nkv": nh, "hd": hd, "mlp": "gelu_erf",
                "residual": "parallel" if c["use_parallel_residual"] else "sequential"}
    return {"norm": "rms_norm", "eps": c["rms_norm_eps"], "theta": float(c["rope_theta"]), "rotary_dim": hd,
            "nh": nh, "nkv": nkv, "hd": hd, "mlp": "swiglu", "residual": "sequential"}


def to_canonical(W, c):
    """Hugging Face tensors -> lminv's canonical names and layouts (sdk/include/lminv/schema.hpp)."""
    nh, nkv, hd = cfg_heads(c)
    out = {}
    if is_neox(c):
        d = c["hidden_size"]
        out["wte.weight"] = W["gpt_neox.embed_in.weight"]
        for i in range(c["num_hidden_layers"]):
            p, h = f"gpt_neox.layers.{i}.", f"h.{i}."
            for ln, canon in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
                out[h + canon + ".weight"] = W[p + ln + ".weight"]
                out[h + canon + ".bias"] = W[p + ln + ".bias"]
            # rows head by head [q k v] -> columns [all q | all k | all v]
            w = W[p + "attention.query_key_value.weight"].view(nh, 3, hd, d)
            out[h + "attn.c_attn.weight"] = w.permute(1, 0, 2, 3).reshape(3 * nh * hd, d).t().contiguous()
            b = W[p + "attention.query_key_value.bias"].view(nh, 3, hd)
            out[h + "attn.c_attn.bias"] = b.permute(1, 0, 2).reshape(-1).contiguous()
            out[h + "attn.c_proj.weight"] = W[p + "attention.dense.weight"].t().contiguous()
            out[h + "attn.c_proj.bias"] = W[p + "attention.dense.bias"]
            out[h + "mlp.c_fc.weight"] = W[p + "mlp.dense_h_to_4h.weight"].t().contiguous()
            out[h + "mlp.c_fc.bias"] = W[p + "mlp.dense_h_to_4h.bias"]
            out[h + "mlp.c_proj.weight"] = W[p + "mlp.dense_4h_to_h.weight"].t().contiguous()
            out[h + "mlp.c_proj.bias"] = W[p + "mlp.dense_4h_to_h.bias"]
        out["ln_f.weight"] = W["gpt_neox.final_layer_norm.weight"]
        out["ln_f.bias"] = W["gpt_neox.final_layer_norm.bias"]
        if "embed_out.weight" in W:
            out["lm_head.weight"] = W["embed_out.weight"]
        return out
    out["wte.weight"] = W["model.embed_tokens.weight"]
    for i in range(c["num_hidden_layers"]):
        p, h = f"model.layers.{i}.", f"h.{i}."
        a = p + "self_attn."
        out[h + "ln_1.weight"] = W[p + "input_layernorm.weight"]
        out[h + "ln_2.weight"] = W[p + "post_attention_layernorm.weight"]
        out[h + "attn.c_attn.weight"] = torch.cat([W[a + n + "_proj.weight"] for n in "qkv"], 0).t().contiguous()
        if a + "q_proj.bias" in W:
            out[h + "attn.c_attn.bias"] = torch.cat([W[a + n + "_proj.bias"] for n in "qkv"], 0)
        out[h + "attn.c_proj.weight"] = W[a + "o_proj.weight"].t().contiguous()
        if a + "o_proj.bias" in W:
            out[h + "attn.c_proj.bias"] = W[a + "o_proj.bias"]
        m = p + "mlp."
        out[h + "mlp.c_fc.weight"] = torch.cat([W[m + "gate_proj.weight"], W[m + "up_proj.weight"]], 0).t().contiguous()
        out[h + "mlp.c_proj.weight"] = W[m + "down_proj.weight"].t().contiguous()
    out["ln_f.weight"] = W["model.norm.weight"]
    if "lm_head.weight" in W:
        out["lm_head.weight"] = W["lm_head.weight"]
    return out


def canonical_model(x_in, Wc, s, blocks, head, input_space, layers=()):
    """architecture.hpp's block, written independently of the Hugging Face modules above."""
    nh, nkv, hd, r = s["nh"], s["nkv"], s["hd"], s["rotary_dim"]

    def norm(x, name):
        w = Wc[name + ".weight"]
        if s["norm"] == "rms_norm":
            return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + s["eps"]) * w
        return F.layer_norm(x, (x.shape[-1],), w, Wc[name + ".bias"], s["eps"])

    def lin(x, name):
        y = torch.matmul(x, Wc[name + ".weight"])
        return y + Wc[name + ".bias"] if name + ".bias" in Wc else y

    def rotate(v, t):  # v [..., hd] at position t: out[i] = v[i] cos - v[i + r/2] sin, out[i + r/2] = ... + v[i] sin
        out = v.clone()
        for i in range(r // 2):
            a = t * s["theta"] ** (-2.0 * i / r)
            cs, sn = math.cos(a), math.sin(a)
            out[..., i] = v[..., i] * cs - v[..., i + r // 2] * sn
            out[..., i + r // 2] = v[..., i + r // 2] * cs + v[..., i] * sn
        return out

    def attn(x, h):
        T = x.shape[1]
        qkv = lin(x, h + "attn.c_attn")
        q = qkv[..., :nh * hd]
        k = qkv[..., nh * hd:(nh + nkv) * hd]
        v = qkv[..., (nh + nkv) * hd:]
        group = nh // nkv
        heads = []
        for j in range(nh):
            g = j // group
            qj = torch.stack([rotate(q[:, t, j * hd:(j + 1) * hd], t) for t in range(T)], 1)
            kg = torch.stack([rotate(k[:, t, g * hd:(g + 1) * hd], t) for t in range(T)], 1)
            vg = v[..., g * hd:(g + 1) * hd]
            scores = torch.einsum("btf,bsf->bts", qj, kg) / math.sqrt(hd)
            scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
            heads.append(torch.einsum("bts,bsf->btf", torch.softmax(scores, -1), vg))
        return lin(torch.cat(heads, -1), h + "attn.c_proj")

    def mlp(x, h):
        u = lin(x, h + "mlp.c_fc")
        if s["mlp"] == "swiglu":
            n = u.shape[-1] // 2
            u = F.silu(u[..., :n]) * u[..., n:]
        else:
            u = 0.5 * u * (1.0 + torch.erf(u / math.sqrt(2.0)))
        return lin(u, h + "mlp.c_proj")

    x = torch.matmul(x_in, Wc["wte.weight"]) if input_space == "vocab" else x_in
    states = [x]
    for i in range(max([blocks] + list(layers))):
        h, prev = f"h.{i}.", states[-1]
        if s["residual"] == "parallel":
            nxt = prev + attn(norm(prev, h + "ln_1"), h) + mlp(norm(prev, h + "ln_2"), h)
        else:
            a = prev + attn(norm(prev, h + "ln_1"), h)
            nxt = a + mlp(norm(a, h + "ln_2"), h)
        states.append(nxt)
    out = states[blocks]
    if head != "none":
        out = norm(out, "ln_f")
    if head == "lm_head":
        out = torch.matmul(out, Wc.get("lm_head.weight", Wc["wte.weight"]).t())
    return torch.cat([out] + [states[l] for l in layers], -1) if layers else out


# ---- inputs ----------------------------------------------------------------------------------------------------


def f32_exact(t):
    return t.to(torch.float32).to(torch.float64)


def make_inputs(W, c, seed):
    """input/embedding [B, T, d] and input/vocab [B, T, V], f32-exact float64: item 0 the token ids, item 1 random."""
    embed = W["gpt_neox.embed_in.weight" if is_neox(c) else "model.embed_tokens.weight"]
    V, d = embed.shape
    T = len(TOKEN_IDS)
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(TOKEN_IDS)
    random_embedding = EMBED_STD * torch.randn(T, d, generator=g, dtype=torch.float64)
    random_vocab = torch.softmax(2.0 * torch.randn(T, V, generator=g, dtype=torch.float64), -1)  # "one-hot-ish"
    return {
        "embedding": f32_exact(torch.stack([embed[ids], random_embedding])),
        "vocab": f32_exact(torch.stack([F.one_hot(ids, V).to(torch.float64), random_vocab])),
    }


# ---- self-checks -----------------------------------------------------------------------------------------------


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def fail(msg):
    raise SystemExit("self-check: " + msg)


def self_check(fixtures):
    gen = torch.Generator().manual_seed(99)
    for n, fx in enumerate(fixtures):
        c, name = fx["config"], fx["name"]
        W = random_weights(c, SEED + n, fx["exact_in"])
        Wc, s = to_canonical(W, c), lminv_setting(c)
        inputs = make_inputs(W, c, SEED + 100 + n)
        L = c["num_hidden_layers"]
        # 1. Hugging Face modules against the canonical implementation, every case.
        for blocks, head, input_space, layers in cases_for(L):
            with torch.no_grad():
                a = hf_model(inputs[input_space], W, c, blocks, head, input_space, layers)
                b = canonical_model(inputs[input_space], Wc, s, blocks, head, input_space, layers)
            if not rel(a, b) < 1e-12:
                fail(f"{name} {case_name(blocks, head, input_space, layers)}: the two implementations differ by "
                     f"{rel(a, b)}")
        x = inputs["embedding"]
        # 2. Batch items independent; position t sees positions <= t only.
        with torch.no_grad():
            full = hf_model(x, W, c, L, "lm_head", "embedding")
            one = hf_model(x[1:], W, c, L, "lm_head", "embedding")
            prefix = hf_model(x[:, :3], W, c, L, "lm_head", "embedding")
        if not (rel(one, full[1:]) < 1e-13 and rel(prefix, full[:, :3]) < 1e-13):
            fail(f"{name}: batch items or causal prefixes disagree")
        # 3. Grouped kv heads equal repeated kv heads.
        nh, nkv, hd = cfg_heads(c)
        if nkv < nh:
            c_mha = dict(c, num_key_value_heads=nh)
            W_mha = dict(W)
            for i in range(L):
                for proj in ("k_proj", "v_proj"):
                    key = f"model.layers.{i}.self_attn.{proj}."
                    w = W[key + "weight"].view(nkv, hd, -1)
                    W_mha[key + "weight"] = w.repeat_interleave(nh // nkv, 0).reshape(nh * hd, -1)
                    if key + "bias" in W:
                        W_mha[key + "bias"] = W[key + "bias"].view(nkv, hd).repeat_interleave(nh // nkv, 0).reshape(-1)
            with torch.no_grad():
                mha = hf_model(x, W_mha, c_mha, L, "lm_head", "embedding")
            if not rel(mha, full) < 1e-12:
                fail(f"{name}: grouped kv heads differ from repeated kv heads by {rel(mha, full)}")
        # 4. Input gradients against finite differences.
        xs = (0.5 * torch.randn(1, 3, c["hidden_size"], generator=gen, dtype=torch.float64)).requires_grad_(True)
        vs = torch.randn(1, 3, c["vocab_size"], generator=gen, dtype=torch.float64).requires_grad_(True)
        for blocks, head, input_space, layers in [(L, "lm_head", "embedding", []), (1, "ln_f", "embedding", []),
                                                  (1, "none", "vocab", [0, L])]:
            t = xs if input_space == "embedding" else vs
            ok = torch.autograd.gradcheck(lambda u: hf_model(u, W, c, blocks, head, input_space, layers), (t,),
                                          eps=1e-6, atol=1e-7, rtol=1e-5)
            if not ok:
                fail(f"{name}: gradcheck failed for {case_name(blocks, head, input_space, layers)}")
    # 5. Rotary scores depend on relative positions only.
    q, k = torch.randn(2, 8, generator=gen, dtype=torch.float64)
    cos, sin = rotary_tables(8, 12, 10000.0, torch.float64)
    def score(m, n):
        return (apply_rotary(q, cos[m], sin[m]) * apply_rotary(k, cos[n], sin[n])).sum()
    if not abs(score(2, 5) - score(6, 9)) < 1e-12 or not abs(score(0, 0) - (q * k).sum()) < 1e-12:
        fail("rotary scores depend on more than the relative position")
    print(f"self-check: {len(fixtures)} families agree with the canonical implementation (< 1e-12); "
          "GQA, rotary, batch, causal prefix and gradcheck pass", file=sys.stderr)


# ---- files -----------------------------------------------------------------------------------------------------

STORE = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def tensor_bytes(t, dtype_name):
    t = t.detach().to(STORE[dtype_name]).contiguous()
    if dtype_name == "BF16":  # numpy has no bfloat16: write its 16 bits
        return t.view(torch.int16).numpy().astype("<i2").tobytes()
    return t.numpy().astype({"F64": "<f8", "F32": "<f4", "F16": "<f2"}[dtype_name]).tobytes()


def write_safetensors(path, tensors, metadata):
    """tensors: name -> (tensor, dtype name). u64 LE header length, JSON header ("__metadata__" first, tensors in
    name order), space padding to a multiple of 8, then the data in the same order without gaps."""
    header = {"__metadata__": dict(metadata)} if metadata else {}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t, dtype_name = tensors[name]
        blob = tensor_bytes(t, dtype_name)
        header[name] = {"dtype": dtype_name, "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
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
    return offset


def read_safetensors(path):
    """Reads back what write_safetensors wrote, as float64 (a check of the writer)."""
    import numpy as np

    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    out = {}
    for name, e in header.items():
        begin, end = e["data_offsets"]
        raw = data[8 + n + begin:8 + n + end]
        if e["dtype"] == "BF16":
            bits = torch.from_numpy(np.frombuffer(raw, dtype="<i2").astype(np.int32)) << 16
            t = bits.to(torch.int32).view(torch.float32)
        else:
            t = torch.from_numpy(np.frombuffer(raw, dtype={"F64": "<f8", "F32": "<f4", "F16": "<f2"}[e["dtype"]])
                                 .astype(np.float64))
        out[name] = (t.to(torch.float64).reshape(e["shape"]), e["dtype"])
    return out, meta


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def write_checkpoint(folder, W, c, store, shards=1, inv_freq_buffers=False):
    os.makedirs(folder, exist_ok=True)
    for old in os.listdir(folder):  # a stale shard or index from an earlier layout would confuse a loader
        if old.endswith(".safetensors") or old.endswith(".index.json"):
            os.remove(os.path.join(folder, old))
    tensors = {name: (t, store) for name, t in W.items()}
    if inv_freq_buffers:  # the non-persistent buffer that older GPT-NeoX checkpoints still saved
        hs = c["hidden_size"] // c["num_attention_heads"]
        r = int(hs * c["rotary_pct"])
        inv_freq = 1.0 / (c["rotary_emb_base"] ** (torch.arange(0, r, 2, dtype=torch.float64) / r))
        for i in range(c["num_hidden_layers"]):
            tensors[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = (inv_freq, "F32")
    config = dict(c, torch_dtype={"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[store])
    write_json(os.path.join(folder, "config.json"), config)
    names = sorted(tensors)
    if shards == 1:
        write_safetensors(os.path.join(folder, "model.safetensors"), tensors, {"format": "pt"})
        files = {"model.safetensors": names}
    else:  # split by name order into `shards` files, as save_pretrained's max_shard_size does
        files, weight_map, total = {}, {}, 0
        per = math.ceil(len(names) / shards)
        for k in range(shards):
            file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[k * per:(k + 1) * per]}
            total += write_safetensors(os.path.join(folder, file), part, {"format": "pt"})
            files[file] = list(part)
            weight_map.update({n: file for n in part})
        write_json(os.path.join(folder, "model.safetensors.index.json"),
                   {"metadata": {"total_size": total}, "weight_map": weight_map})
    for file, part in files.items():  # read back: every tensor exact
        back, meta = read_safetensors(os.path.join(folder, file))
        assert meta == {"format": "pt"} and sorted(back) == sorted(part), folder
        for n in part:
            assert torch.equal(back[n][0], tensors[n][0].to(STORE[tensors[n][1]]).to(torch.float64)), n


def make_golden(folder, W, c, inputs):
    L = c["num_hidden_layers"]
    golden = {"input/" + k: (v, "F64") for k, v in inputs.items()}
    W32 = {k: v.to(torch.float32) for k, v in W.items()}
    cases = []
    for n, (blocks, head, input_space, layers) in enumerate(cases_for(L)):
        name = case_name(blocks, head, input_space, layers)
        spec = dict(blocks=blocks, head=head, input_space=input_space, layers=layers)
        x = inputs[input_space]
        with torch.no_grad():
            shape = hf_model(x, W, c, **spec).shape
        G = f32_exact(torch.randn(shape, generator=torch.Generator().manual_seed(SEED + 1000 + n),
                                  dtype=torch.float64))
        out64, grad64 = vjp(x, G, W, c, **spec)
        out32, grad32 = vjp(x.to(torch.float32), G.to(torch.float32), W32, c, **spec)
        # the float32 run must be close to the float64 one, or a 1e-4 tolerance would not be fair
        for what, a, b in (("output", out32, out64), ("grad_input", grad32, grad64)):
            if not rel(a.to(torch.float64), b) < 1e-5:
                fail(f"{folder} {name}: float32 {what} is {rel(a.to(torch.float64), b)} from float64")
        p = f"case/{name}/"
        golden[p + "grad_output"] = (G, "F64")
        golden[p + "f64/output"] = (out64, "F64")
        golden[p + "f64/grad_input"] = (grad64, "F64")
        golden[p + "f32/output"] = (out32, "F32")
        golden[p + "f32/grad_input"] = (grad32, "F32")
        cases.append((name, case_spec_string(blocks, head, input_space, layers)))
    metadata = {
        "generator": "tests/tools/make_family_golden.py",
        "torch_version": torch.__version__.split("+")[0],
        "family": c["model_type"],
        "token_ids": " ".join(str(i) for i in TOKEN_IDS),
        "cases": " ".join(n for n, _ in cases),
    }
    metadata.update({"case/" + n: s for n, s in cases})
    path = os.path.join(folder, "golden.safetensors")
    write_safetensors(path, golden, metadata)
    back, meta = read_safetensors(path)
    assert meta == metadata and sorted(back) == sorted(golden)
    return [n for n, _ in cases]


def make_fixtures(out_dir, fixtures):
    manifest = {"description": "decoder-family golden values from PyTorch; see tests/tools/README.md",
                "seq_len": len(TOKEN_IDS), "batch": BATCH, "token_ids": TOKEN_IDS, "folders": []}
    weights = {}
    for n, fx in enumerate(fixtures):
        c, name = fx["config"], fx["name"]
        W = random_weights(c, SEED + n, fx["exact_in"])
        weights[name] = W
        folder = os.path.join(out_dir, name)
        write_checkpoint(folder, W, c, "F32")
        cases = make_golden(folder, W, c, make_inputs(W, c, SEED + 100 + n))
        manifest["folders"].append({"folder": name, "family": c["model_type"], "stored": "F32", "shards": 1,
                                    "golden": name, "cases": cases, "lminv": fx["lminv"]})
    for v in VARIANTS:
        fx = next(f for f in fixtures if f["name"] == v["of"])
        write_checkpoint(os.path.join(out_dir, v["folder"]), weights[v["of"]], fx["config"], v["store"],
                         v["shards"], v.get("inv_freq_buffers", False))
        manifest["folders"].append({"folder": v["folder"], "family": fx["config"]["model_type"], "stored": v["store"],
                                    "shards": v["shards"], "golden": v["of"], "cases": [], "lminv": fx["lminv"]})
    write_json(os.path.join(out_dir, "manifest.json"), manifest)
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(out_dir) for f in files)
    print(f"wrote {len(manifest['folders'])} folders to {out_dir} ({size} bytes)", file=sys.stderr)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(here, "..", "data", "family-golden"))
    parser.add_argument("--check-only", action="store_true", help="run the self-checks and write nothing")
    args = parser.parse_args()
    torch.set_num_threads(1)  # reduction order, hence the last bits, independent of the machine's core count
    self_check(FIXTURES)
    if not args.check_only:
        os.makedirs(args.out, exist_ok=True)
        make_fixtures(os.path.normpath(args.out), FIXTURES)


if __name__ == "__main__":
    main()
