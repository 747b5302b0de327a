#!/usr/bin/env python3
"""Reference logits for a Llama-architecture GGUF model, independent of holdfast's code.

Reads the file with the `gguf` package (its own parser and dequantizers), tokenizes with the
`tokenizers` package, and runs the decoder in numpy float64 exactly as llama.cpp lays it out:
Q/K rows stay in the file's permuted order and rotary embeddings rotate adjacent pairs
(ggml's "normal" rope), so holdfast's un-permutation plus half-split rope is checked against
an independent formulation rather than against itself.

Writes OUT/reference.json (prompts, token ids, greedy continuation) and, per prompt,
OUT/logits-<i>.f32: little-endian float32 logits [positions, vocab].
"""

import argparse
import json
import os

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import Tokenizer


def field(reader, key):
    return reader.fields[key].contents()


def load(path):
    reader = GGUFReader(path)
    assert field(reader, "general.architecture") == "llama"
    cfg = {
        "layers": int(field(reader, "llama.block_count")),
        "heads": int(field(reader, "llama.attention.head_count")),
        "kv_heads": int(field(reader, "llama.attention.head_count_kv")),
        "theta": float(field(reader, "llama.rope.freq_base")),
        "eps": float(field(reader, "llama.attention.layer_norm_rms_epsilon")),
    }
    weights = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float64)
        # numpy shape is outermost first: [out, in] for matrices.
        weights[t.name] = w.reshape([int(d) for d in reversed(t.shape)])
    return cfg, weights


def rms_norm(x, g, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g


def rope_adjacent_pairs(x, theta):
    """ggml rope, mode 0: rotates (x[2i], x[2i+1]) by pos * theta^(-2i/d). x: [heads, t, d]."""
    _, t, d = x.shape
    inv_freq = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    angle = np.arange(t, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angle), np.sin(angle)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def forward(cfg, w, ids):
    t = len(ids)
    nh, nkv = cfg["heads"], cfg["kv_heads"]
    x = w["token_embd.weight"][ids]
    hd = x.shape[1] // nh
    mask = np.triu(np.full((t, t), -np.inf), k=1)
    for i in range(cfg["layers"]):
        p = lambda n: w[f"blk.{i}.{n}.weight"]
        h = rms_norm(x, p("attn_norm"), cfg["eps"])
        q = (h @ p("attn_q").T).reshape(t, nh, hd).transpose(1, 0, 2)
        k = (h @ p("attn_k").T).reshape(t, nkv, hd).transpose(1, 0, 2)
        v = (h @ p("attn_v").T).reshape(t, nkv, hd).transpose(1, 0, 2)
        q, k = rope_adjacent_pairs(q, cfg["theta"]), rope_adjacent_pairs(k, cfg["theta"])
        k, v = np.repeat(k, nh // nkv, axis=0), np.repeat(v, nh // nkv, axis=0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v
        x = x + a.transpose(1, 0, 2).reshape(t, nh * hd) @ p("attn_output").T
        h = rms_norm(x, p("ffn_norm"), cfg["eps"])
        gate = h @ p("ffn_gate").T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ p("ffn_up").T)) @ p("ffn_down").T
    x = rms_norm(x, w["output_norm.weight"], cfg["eps"])
    head = w.get("output.weight", w["token_embd.weight"])
    return x @ head.T


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("prompts", nargs="+")
    args = ap.parse_args()

    cfg, w = load(args.gguf)
    tok = Tokenizer.from_file(args.tokenizer)
    os.makedirs(args.out, exist_ok=True)
    report = []
    for n, text in enumerate(args.prompts):
        ids = tok.encode(text, add_special_tokens=False).ids
        logits = forward(cfg, w, ids)
        name = f"logits-{n}.f32"
        logits.astype("<f4").tofile(os.path.join(args.out, name))
        seq, greedy = list(ids), []
        step_logits = logits
        for _ in range(args.new_tokens):
            nxt = int(np.argmax(step_logits[-1]))
            greedy.append(nxt)
            seq.append(nxt)
            step_logits = forward(cfg, w, seq)
        report.append({
            "text": text,
            "ids": ids,
            "logits_file": name,
            "vocab": int(logits.shape[1]),
            "greedy_ids": greedy,
            "greedy_text": tok.decode(greedy),
        })
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        json.dump({"prompts": report}, f, indent=1)


if __name__ == "__main__":
    main()
