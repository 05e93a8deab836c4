#!/usr/bin/env python3
"""Write a Llama checkpoint directory (HF layout, as bench/models.mjs writes it: config.json,
tokenizer.json, model.safetensors in f32 or bf16) as a GGUF v3 file for the node-llama-cpp peer.

  /usr/bin/python3 bench/peers/export_gguf.py .bench-cache/llama-110m-float32 /tmp/llama-110m.gguf

Matrices keep the checkpoint's dtype (F32 or BF16); 1-D norm weights are written as F32. q/k rows are
reordered from the HF rotate-half RoPE layout to the pairwise layout llama.cpp's "llama" architecture
uses, so the file computes the same function. The vocabulary comes from tokenizer.json (SentencePiece
style pieces; specials as control tokens, <0xNN> as byte tokens). Our own writer, written from the
GGUF format description. Benchmark-only tool.
"""
import argparse
import json
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_peer import load_checkpoint  # noqa: E402

# GGUF value types
U32, I32, F32, BOOL, STR, ARR = 4, 5, 6, 7, 8, 9
# ggml tensor types
GGML_F32, GGML_BF16 = 0, 30
ALIGN = 32


def gstr(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype, value):
    out = gstr(key) + struct.pack("<I", vtype)
    if vtype == U32:
        out += struct.pack("<I", value)
    elif vtype == I32:
        out += struct.pack("<i", value)
    elif vtype == F32:
        out += struct.pack("<f", value)
    elif vtype == BOOL:
        out += struct.pack("<?", value)
    elif vtype == STR:
        out += gstr(value)
    else:
        raise ValueError(vtype)
    return out


def kv_array(key, etype, values):
    out = gstr(key) + struct.pack("<I", ARR) + struct.pack("<IQ", etype, len(values))
    if etype == STR:
        out += b"".join(gstr(v) for v in values)
    elif etype == F32:
        out += np.asarray(values, dtype="<f4").tobytes()
    elif etype == I32:
        out += np.asarray(values, dtype="<i4").tobytes()
    else:
        raise ValueError(etype)
    return out


def to_numpy(t):
    """(raw numpy array, ggml type) without changing values: bf16 stays as its 16-bit pattern."""
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy(), GGML_BF16
    return t.float().numpy(), GGML_F32


def rope_pairwise(w, n_head):
    """Rows of a q/k projection [n_head * hd, in]: from (i, i + hd/2) pairs to (2i, 2i + 1) pairs."""
    rows, cols = w.shape
    hd = rows // n_head
    return w.reshape(n_head, 2, hd // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def vocab_from(dir_):
    with open(os.path.join(dir_, "tokenizer.json")) as f:
        tj = json.load(f)
    vocab = tj["model"]["vocab"]
    n = max(vocab.values()) + 1
    for a in tj.get("added_tokens", []):
        n = max(n, a["id"] + 1)
    tokens = [f"<unused_{i}>" for i in range(n)]
    types = [5] * n  # unused
    for piece, i in vocab.items():
        tokens[i] = piece
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            types[i] = 6  # byte
        elif piece.startswith("<unused_"):
            types[i] = 5
        else:
            types[i] = 1  # normal
    for a in tj.get("added_tokens", []):
        tokens[a["id"]] = a["content"]
        types[a["id"]] = 2 if a["content"] == tj["model"].get("unk_token") else 3
    return tokens, types


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("out")
    a = ap.parse_args()
    cfg, w = load_checkpoint(a.dir)
    if cfg.get("model_type") != "llama":
        sys.exit("export_gguf.py writes Llama checkpoints only")
    L, D = cfg["num_hidden_layers"], cfg["hidden_size"]
    H = cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads", H)
    hd = cfg.get("head_dim", D // H)
    tokens, types = vocab_from(a.dir)

    # tensors in GGUF names
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    per = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for l in range(L):
        for hf, gg in per.items():
            names[f"model.layers.{l}.{hf}.weight"] = f"blk.{l}.{gg}.weight"
    tensors = []
    any_bf16 = False
    for hf, gg in names.items():
        if hf not in w:
            continue
        arr, gtype = to_numpy(w[hf])
        if arr.ndim == 1 and gtype != GGML_F32:
            arr, gtype = w[hf].float().numpy(), GGML_F32
        if hf.endswith("q_proj.weight"):
            arr = rope_pairwise(arr, H)
        elif hf.endswith("k_proj.weight"):
            arr = rope_pairwise(arr, KV)
        any_bf16 |= gtype == GGML_BF16
        tensors.append((gg, np.ascontiguousarray(arr), gtype))

    meta = [
        kv("general.architecture", STR, "llama"),
        kv("general.name", STR, os.path.basename(a.dir.rstrip("/"))),
        kv("general.alignment", U32, ALIGN),
        kv("general.file_type", U32, 32 if any_bf16 else 0),
        kv("llama.context_length", U32, cfg.get("max_position_embeddings", 2048)),
        kv("llama.embedding_length", U32, D),
        kv("llama.block_count", U32, L),
        kv("llama.feed_forward_length", U32, cfg["intermediate_size"]),
        kv("llama.rope.dimension_count", U32, hd),
        kv("llama.attention.head_count", U32, H),
        kv("llama.attention.head_count_kv", U32, KV),
        kv("llama.attention.layer_norm_rms_epsilon", F32, cfg.get("rms_norm_eps", 1e-6)),
        kv("llama.rope.freq_base", F32, float(cfg.get("rope_theta", 10000.0))),
        kv("llama.vocab_size", U32, cfg["vocab_size"]),
        kv("tokenizer.ggml.model", STR, "llama"),
        kv_array("tokenizer.ggml.tokens", STR, tokens),
        kv_array("tokenizer.ggml.scores", F32, [0.0] * len(tokens)),
        kv_array("tokenizer.ggml.token_type", I32, types),
        kv("tokenizer.ggml.bos_token_id", U32, cfg.get("bos_token_id", 1)),
        kv("tokenizer.ggml.eos_token_id", U32, cfg.get("eos_token_id", 2)),
        kv("tokenizer.ggml.unknown_token_id", U32, 0),
        kv("tokenizer.ggml.add_bos_token", BOOL, True),
    ]
    infos = b""
    offset = 0
    offsets = []
    for name, arr, gtype in tensors:
        offsets.append(offset)
        dims = list(reversed(arr.shape))  # ggml: ne[0] is the innermost dimension
        infos += gstr(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", gtype, offset)
        offset += arr.nbytes
        offset += (-offset) % ALIGN
    with open(a.out + ".tmp", "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta)))
        for m in meta:
            f.write(m)
        f.write(infos)
        f.write(b"\0" * ((-f.tell()) % ALIGN))
        start = f.tell()
        for (name, arr, gtype), off in zip(tensors, offsets):
            f.write(b"\0" * (start + off - f.tell()))
            f.write(arr.tobytes())
    os.replace(a.out + ".tmp", a.out)
    print(f"wrote {a.out}: {len(tensors)} tensors, {'BF16' if any_bf16 else 'F32'}")


if __name__ == "__main__":
    main()
