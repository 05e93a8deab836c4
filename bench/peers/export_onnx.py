#!/usr/bin/env python3
"""Export a GPT-2 checkpoint directory (HF layout, as bench/models.mjs writes) to two ONNX graphs for the
onnxruntime-node peer (bench/peers/ort_peer.mjs):

  prefill.onnx: input_ids int64 [B, T] (T fixed, B dynamic) -> logits [B, T, V], present_k/v [L, B, H, T, hd]
  decode.onnx:  input_ids int64 [B, 1], position int64 [B, 1], past_k/v [L, B, H, P, hd] (P dynamic)
                -> logits [B, 1, V], present_k/v [L, B, H, P + 1, hd]

  /usr/bin/python3 bench/peers/export_onnx.py .bench-cache/gpt2-124m-float32 /tmp/gpt2-onnx [--seq 128]

Our own minimal forward (the same math as bench/peers/torch_peer.py), traced with torch.onnx.export.
Benchmark-only tool.
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_peer import GPT2, load_checkpoint  # noqa: E402


class _Body(torch.nn.Module):
    """GPT-2 blocks with concatenated KV (what an exported graph can express)."""

    def __init__(self, m: GPT2):
        super().__init__()
        self.m = m

    def run(self, ids, pos, past_k=None, past_v=None):
        m = self.m
        B, T = ids.shape
        H, hd, D = m.H, m.head_dim, m.D
        x = m.wte[ids] + m.wpe[pos]
        ks, vs = [], []
        for l, p in enumerate(m.layers):
            h = F.layer_norm(x, (D,), p["ln_1.weight"], p["ln_1.bias"], m.eps)
            qkv = (torch.matmul(h, p["attn.c_attn.weight"]) + p["attn.c_attn.bias"]).view(B, T, 3, H, hd)
            q = qkv[:, :, 0].transpose(1, 2)
            k = qkv[:, :, 1].transpose(1, 2)
            v = qkv[:, :, 2].transpose(1, 2)
            if past_k is not None:
                k = torch.cat([past_k[l], k], dim=2)
                v = torch.cat([past_v[l], v], dim=2)
            ks.append(k)
            vs.append(v)
            s = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(hd))
            if past_k is None:
                causal = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
                s = s + causal
            o = torch.matmul(torch.softmax(s, dim=-1), v).transpose(1, 2).reshape(B, T, D)
            x = x + torch.matmul(o, p["attn.c_proj.weight"]) + p["attn.c_proj.bias"]
            h = F.layer_norm(x, (D,), p["ln_2.weight"], p["ln_2.bias"], m.eps)
            u = F.gelu(torch.matmul(h, p["mlp.c_fc.weight"]) + p["mlp.c_fc.bias"], approximate="tanh")
            x = x + torch.matmul(u, p["mlp.c_proj.weight"]) + p["mlp.c_proj.bias"]
        x = F.layer_norm(x, (D,), m.lnf_w, m.lnf_b, m.eps)
        logits = torch.matmul(x, m.head.t())
        return logits, torch.stack(ks), torch.stack(vs)


class Prefill(_Body):
    def forward(self, input_ids):
        T = input_ids.shape[1]
        pos = torch.arange(T).unsqueeze(0).expand_as(input_ids)
        return self.run(input_ids, pos)


class Decode(_Body):
    def forward(self, input_ids, position, past_k, past_v):
        return self.run(input_ids, position, past_k, past_v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("out")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--opset", type=int, default=17)
    a = ap.parse_args()
    cfg, w = load_checkpoint(a.dir)
    if cfg.get("model_type") != "gpt2":
        sys.exit("export_onnx.py exports GPT-2 checkpoints only")
    m = GPT2(cfg, w)
    os.makedirs(a.out, exist_ok=True)
    L, H, hd = m.L, m.H, m.head_dim
    kv_names = ["present_k", "present_v"]
    with torch.inference_mode(False), torch.no_grad():
        ids = torch.zeros(1, a.seq, dtype=torch.int64)
        torch.onnx.export(Prefill(m), (ids,), os.path.join(a.out, "prefill.onnx"), input_names=["input_ids"], output_names=["logits"] + kv_names,
                          dynamic_axes={"input_ids": {0: "batch"}, "logits": {0: "batch"}, "present_k": {1: "batch"}, "present_v": {1: "batch"}}, opset_version=a.opset)
        past = torch.zeros(L, 1, H, 4, hd)
        torch.onnx.export(Decode(m), (torch.zeros(1, 1, dtype=torch.int64), torch.full((1, 1), 4, dtype=torch.int64), past, past.clone()), os.path.join(a.out, "decode.onnx"),
                          input_names=["input_ids", "position", "past_k", "past_v"], output_names=["logits"] + kv_names,
                          dynamic_axes={"input_ids": {0: "batch"}, "position": {0: "batch"}, "past_k": {1: "batch", 3: "past"}, "past_v": {1: "batch", 3: "past"},
                                        "logits": {0: "batch"}, "present_k": {1: "batch", 3: "total"}, "present_v": {1: "batch", 3: "total"}}, opset_version=a.opset)
    with open(os.path.join(a.out, "meta.txt"), "w") as f:
        f.write(f"layers={L} heads={H} head_dim={hd} vocab={cfg['vocab_size']} seq={a.seq}\n")
    print(f"wrote {a.out}/prefill.onnx and decode.onnx")


if __name__ == "__main__":
    main()
