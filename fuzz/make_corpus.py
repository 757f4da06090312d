#!/usr/bin/python3
"""Writes the seed corpora of the fuzzers (fuzz/corpus/<name>/) from tests/data, data/ and files made the way lminv
writes them. Run from anywhere: /usr/bin/python3 fuzz/make_corpus.py (numpy only). The corpus is committed; rerun
this after a format change and commit the result. Regression inputs (fuzz/corpus/<name>/regression-*) are kept."""
import json
import os
import pathlib
import shutil
import struct

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "fuzz" / "corpus"
TESTS = ROOT / "tests" / "data"


def put(fuzzer, name, data):
    d = OUT / fuzzer
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / name).write_bytes(data)


def reset(fuzzer):
    d = OUT / fuzzer
    if d.exists():
        for f in d.iterdir():
            if not f.name.startswith("regression-"):
                f.unlink()


def safetensors(tensors, metadata=None):
    """The reference layout: compact header, __metadata__ first, padded with spaces to 8 bytes."""
    header, data = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def byte_unicode():
    """GPT-2's bytes_to_unicode."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


# ---- safetensors --------------------------------------------------------------------------------------------------
reset("safetensors")
for f in sorted((TESTS / "states").glob("*.safetensors")):
    put("safetensors", f.name, f.read_bytes())
put("safetensors", "gpt_neox-f16.safetensors", (TESTS / "family-golden/gpt_neox-f16/model.safetensors").read_bytes())
put("safetensors", "empty.safetensors", safetensors({}))
put("safetensors", "metadata-only.safetensors", safetensors({}, {"format": "pt", "blocks": "2"}))
put("safetensors", "all-dtypes.safetensors", safetensors({
    "a": ("F64", [2], struct.pack("<2d", 1.5, -2)),
    "b": ("F32", [1, 2], struct.pack("<2f", 3, 4)),
    "c": ("BF16", [3], b"\x80\x3f\x00\x40\x80\x7f"),
    "d": ("F16", [2, 1], b"\x00\x3c\x00\x7c"),
    "e": ("F32", [0, 4], b""),
    "f": ("F32", [], struct.pack("<f", 7)),
}, {"format": "pt"}))

# ---- checkpoint (config.json) -------------------------------------------------------------------------------------
reset("checkpoint")
configs = list((TESTS / "family-golden").glob("*/config.json")) + list((TESTS / "gpt2-golden").glob("*/config.json"))
for f in sorted(configs):
    put("checkpoint", f.parent.name + ".json", f.read_bytes())
llama = json.loads((TESTS / "family-golden/llama/config.json").read_text())
put("checkpoint", "llama-rope-scaling.json", json.dumps(dict(llama, rope_scaling={"type": "linear", "factor": 2.0})))
put("checkpoint", "llama-head-dim.json", json.dumps(dict(llama, head_dim=8, tie_word_embeddings=True)))
put("checkpoint", "gpt2-minimal.json", '{"model_type": "gpt2", "n_layer": 0, "n_embd": 8, "n_head": 2, '
    '"vocab_size": 16, "n_positions": 8, "n_inner": null}')

# ---- GPT-2 tables -------------------------------------------------------------------------------------------------
reset("gpt2_tokenizer")
bu = byte_unicode()
vocab = {bu[b]: b for b in range(256)}
merges = []
for a, b in [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("l", "l"), ("o", "r"), ("Ġ", "w"), ("Ġw", "or"), ("ll", "o"),
             ("H", "e"), ("He", "llo"), ("Ġ", "Ġ"), ("1", "2"), ("12", "3")]:
    vocab.setdefault(a + b, len(vocab))
    merges.append(a + " " + b)
vocab["<|endoftext|>"] = len(vocab)
for flag in (0, 1):
    put("gpt2_tokenizer", f"tiny-{flag}", bytes([flag]) + json.dumps(vocab, ensure_ascii=False).encode() +
        b"\n--merges--\n" + ("#version: 0.2\n" + "\n".join(merges) + "\n").encode())
put("gpt2_tokenizer", "crlf", b"\x00" + json.dumps(vocab).encode() + b"\n--merges--\n" +
    ("\r\n".join(merges)).encode())
gap = dict(vocab)
gap["Ġthe"] = 400  # a gap in the id range
put("gpt2_tokenizer", "gap", b"\x01" + json.dumps(gap).encode() + b"\n--merges--\n" + "\n".join(merges).encode())

# ---- tokenizer.json -----------------------------------------------------------------------------------------------
reset("hf_tokenizer")


def mini_tokenizer(path, keep):
    """tokenizer.json with the first `keep` ids of the vocabulary and the merges among them; the rest as it is."""
    t = json.loads(path.read_text())
    model = t["model"]
    v = {k: i for k, i in model["vocab"].items() if i < keep}
    out = []
    for m in model.get("merges", []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a in v and b in v and a + b in v:
            out.append(m)
    model["vocab"], model["merges"] = v, out
    t["added_tokens"] = t.get("added_tokens", [])[:6]
    return json.dumps(t, ensure_ascii=False)


TEXT = " Hello world, it's 2026!\n\tcafé 12345 <s> naïve  x"
for name, keep in [("llama2", 600), ("llama3", 700), ("qwen3", 700)]:
    d = ROOT / "data/tokenizers" / name
    body = mini_tokenizer(d / "tokenizer.json", keep)
    put("hf_tokenizer", name, body)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("added_tokens_decoder", None)
    cfg.pop("chat_template", None)
    put("hf_tokenizer", name + "-config-text", body + "\n--part--\n" + json.dumps(cfg) + "\n--part--\n" + TEXT)
put("hf_tokenizer", "wordlevel", '{"model": {"type": "WordLevel", "vocab": {"a": 0}}}')
put("hf_tokenizer", "minimal-bpe", json.dumps({
    "version": "1.0", "added_tokens": [{"id": 3, "content": "<s>", "special": True, "single_word": False,
                                        "lstrip": False, "rstrip": False, "normalized": False}],
    "normalizer": {"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"},
                                                        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
                                                        {"type": "Prepend", "prepend": "▁"}, {"type": "Strip",
                                                        "strip_left": True, "strip_right": False}]},
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\s+|\\p{L}+"}, "behavior": "Isolated", "invert": False},
        {"type": "Digits", "individual_digits": True},
        {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": True}]},
    "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                                                {"Sequence": {"id": "A", "type_id": 0}}],
                       "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [3], "tokens": ["<s>"]}}},
    "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                                                 {"type": "ByteFallback"}, {"type": "Fuse"},
                                                 {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
    "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "fuse_unk": True, "byte_fallback": True,
              "vocab": {"<unk>": 0, "▁": 1, "a": 2, "<0x41>": 4, "▁a": 5, "b": 6, "ab": 7},
              "merges": [["▁", "a"], "a b"]}}, ensure_ascii=False) + "\n--part--\n" +
    '{"add_bos_token": true, "bos_token": "<s>"}\n--part--\nA ab ba <s>b 12')

# ---- encoding with the real tokenizers ----------------------------------------------------------------------------
reset("tokenizer_encode")
texts = [json.loads(l)["text"] for l in (TESTS / "tokenizer_cases.jsonl").read_text().splitlines() if l.strip()]
texts += [json.loads(l)["text"] for l in (TESTS / "tokenizer-corpus.jsonl").read_text().splitlines() if l.strip()]
for i, text in enumerate(texts[:40]):
    put("tokenizer_encode", f"text-{i:02d}", bytes([i % 4]) + text.encode())
put("tokenizer_encode", "invalid-utf8", b"\x01caf\xc3 \xff\xfe\xed\xa0\x80 \xf4\x90\x80\x80 x")

# ---- INI configs ----------------------------------------------------------------------------------------------------
reset("config")
for f in sorted(TESTS.glob("*.ini")) + sorted((ROOT / "configs").glob("*.ini")):
    put("config", f.name, f.read_bytes())
put("config", "set-overrides.ini", (TESTS / "tiny-gpt2.ini").read_text() +
    "\n--set--\nmodel.n_layer=2\nprompt.ids=1,2,3\nbackend.dtype=f64\nmodel.layers=0,1\noutput.snapshot_steps=1,5")
put("config", "semicolons.ini", "; comment\n[model]\nfamily = llama ; trailing\nn_embd = 64 # hash\nn_head=4\n"
    "n_kv_head = 2\nnorm = rms_norm\npositions = rotary\nrope_theta = 1e4\n[prompt]\ntext = a; b\n")

# ---- prompt files ---------------------------------------------------------------------------------------------------
reset("prompts")
put("prompts", "tiny.txt", b"\x00" + (TESTS / "prompts-tiny.txt").read_bytes())
put("prompts", "twenty.txt", b"\x04" + (TESTS / "prompts-20.txt").read_bytes()[:4000])
put("prompts", "corpus.jsonl", b"\x08" + (TESTS / "tokenizer-corpus.jsonl").read_bytes()[:3000])
put("prompts", "mixed.jsonl", b"\x01# a comment\n\n{\"ids\": [1, 2, 999], \"kind\": \"random\"}\n"
    b"{\"text\": \"The sky\", \"ids\": [464, 6766]}\nplain text line\r\n{\"text\": \"only text\"}\n   \n")

# ---- records --------------------------------------------------------------------------------------------------------
reset("records")
rec = (ROOT / "runs/invert/records/pytorch-f32.jsonl")
if rec.exists():
    put("records", "invert-record.jsonl", rec.read_text().splitlines()[0][:6000] + "\n")
sweep = []
for i in range(3):
    sweep.append(json.dumps({"exact_match": i != 1, "token_accuracy": 0.5 * i, "time_s": {"optimize": 1.25 * i},
                             "values": {"candidates_per_position": 3.0}, "certificate": {"verdict": "unique"},
                             "sweep": {"key": f"0123456789abcdef/{i}/1,2,3", "prompt_index": i, "grid": {},
                                       "grid_label": "-", "config_file": "a.ini", "overrides": []}}))
put("records", "sweep.jsonl", "\n".join(sweep) + "\n")
put("records", "torn.jsonl", "\n".join(sweep) + "\n" + sweep[0][:40])
put("records", "no-key.jsonl", '{"a": 1}\n[1, 2]\n"text"\n{"sweep": 3}\n{"sweep": {"key": 5}}\n')

# ---- pinv cache and ids files ---------------------------------------------------------------------------------------
reset("pinv_cache")
for v, d in [(1, 1), (4, 3), (8, 8)]:
    header = b"LMINVPIV" + struct.pack("<IIqqQQqdd", 1, 72, d, v, 0, 0, min(v, d), 2.5, 1e-12)
    payload = struct.pack(f"<{d * d}d", *[float(i % 5) for i in range(d * d)])
    sel = (v - 1) | ((d - 1) << 3)
    put("pinv_cache", f"cache-{v}x{d}", bytes([sel, 7]) + header + payload)
    put("pinv_cache", f"cache-{v}x{d}-raw", bytes([sel, 0]) + header + payload)
put("pinv_cache", "ids-commas", b"\x00\x08" + b"1, 2,3\n  40\t5,,\n")
put("pinv_cache", "ids-bad", b"\x00\x08" + b"12 x3 -4")

# ---- npy / npz ------------------------------------------------------------------------------------------------------
reset("npy")
for f in sorted((TESTS / "states").glob("*.npy")):
    put("npy", "mem-" + f.name, b"\x00" + f.read_bytes())
    put("npy", "file-" + f.name, b"\x01" + f.read_bytes())
for f in sorted((TESTS / "states").glob("*.npz")):
    put("npy", f.name, b"\x02" + f.read_bytes())

# ---- states ---------------------------------------------------------------------------------------------------------
reset("states")
ext = {".safetensors": 0, ".npy": 1, ".npz": 2, ".jsonl": 3}
for f in sorted((TESTS / "states").iterdir()):
    e = ext.get(f.suffix)
    if e is None:
        continue
    body = f.read_bytes()
    if f.suffix == ".jsonl":
        body = (b'{"states": "v1.npy", "ids": [1, 2, 3]}\n\n{"states": "f32.safetensors", "name": "output", '
                b'"text": "ignored"}\n{"states": "set.npz"}\n')
    put("states", "one-" + f.name, bytes([e]) + body)     # read_states, no name
    put("states", "set-" + f.name, bytes([e + 5]) + body)  # read_states_set
put("states", "output-f32.bin", bytes([4 + 10]) + (TESTS / "states/f32.safetensors").read_bytes())

total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
print(f"fuzz/corpus: {sum(1 for f in OUT.rglob('*') if f.is_file())} files, {total} bytes")
