#!/usr/bin/env python3
"""PyTorch CPU peer for bench/models.mjs: a minimal GPT-2 / Llama forward of our own over an HF-layout
checkpoint directory (config.json + model.safetensors, f32 or bf16), timed like ours.

  GOMP_SPINCOUNT=0 OPENBLAS_CORETYPE=Cooperlake OPENBLAS_NUM_THREADS=2 \
    /usr/bin/python3 bench/peers/torch_peer.py .bench-cache/gpt2-124m-float32 --name gpt2-124m \
        --threads 2 --prefill 1x128,8x128 --decode --steps 32 --reps 5

One JSON line per result, in the schema of bench/models.mjs (bench models.prefill / models.decode,
peer "torch", model, shape, threads, ms = median, best_ms, reps, peak_rss_mib). Weights stay in the
checkpoint's dtype (bf16 checkpoints compute in bf16, as `model.to(torch.bfloat16)` would). Prefill
returns full logits [B, T, V]; decode is batch 1 with a preallocated KV cache after a 128-token prompt,
one forward on the last position per step plus the greedy pick. Also usable as a module:
`load_checkpoint`, `GPT2`, `Llama` (bench/peers/export_onnx.py builds on them).
Benchmark-only tool: never a test dependency.
"""
import argparse
import json
import math
import os
import resource
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

# ------------------------------------------------------------------ safetensors (minimal reader)
_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.int16, "I32": np.int32, "I64": np.int64}


def read_safetensors(path):
    """name -> torch tensor, memory-mapped (copy-on-read views of the file)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    base = 8 + n
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        arr = mm[base + a: base + b].view(_NP[info["dtype"]]).reshape(info["shape"])
        t = torch.from_numpy(np.array(arr))  # own copy: torch wants writable memory
        if info["dtype"] == "BF16":
            t = t.view(torch.bfloat16)
        out[name] = t
    return out


def load_checkpoint(d):
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    idx = os.path.join(d, "model.safetensors.index.json")
    w = {}
    if os.path.exists(idx):
        with open(idx) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        for fn in files:
            w.update(read_safetensors(os.path.join(d, fn)))
    else:
        w.update(read_safetensors(os.path.join(d, "model.safetensors")))
    return cfg, w


# ------------------------------------------------------------------ models
def causal_attention(q, k, v, past_len):
    """q [B, H, Tq, D], k/v [B, H, Tk, D] (Tk = past_len + Tq)."""
    d = q.shape[-1]
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)
    tq, tk = q.shape[2], k.shape[2]
    if tq > 1:
        i = torch.arange(tq).unsqueeze(1) + past_len
        j = torch.arange(tk).unsqueeze(0)
        s = s.masked_fill(j > i, float("-inf"))
    return torch.matmul(torch.softmax(s.float(), dim=-1).to(q.dtype), v)


class GPT2(torch.nn.Module):
    def __init__(self, cfg, w):
        super().__init__()
        g = lambda k: w.get("transformer." + k, w.get(k))
        self.L, self.D, self.H = cfg["n_layer"], cfg["n_embd"], cfg["n_head"]
        self.eps = cfg.get("layer_norm_epsilon", 1e-5)
        self.wte, self.wpe = g("wte.weight"), g("wpe.weight")
        self.head = w.get("lm_head.weight", self.wte)
        self.layers = []
        for l in range(self.L):
            p = f"h.{l}."
            self.layers.append({k: g(p + k) for k in ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"]})
        self.lnf_w, self.lnf_b = g("ln_f.weight"), g("ln_f.bias")
        self.kv_heads, self.head_dim = self.H, self.D // self.H

    def forward(self, ids, pos, cache=None, past_len=0, last_only=False):
        B, T = ids.shape
        H, hd = self.H, self.head_dim
        x = self.wte[ids] + self.wpe[pos]
        for l, p in enumerate(self.layers):
            h = F.layer_norm(x, (self.D,), p["ln_1.weight"], p["ln_1.bias"], self.eps)
            qkv = torch.addmm(p["attn.c_attn.bias"], h.reshape(B * T, self.D), p["attn.c_attn.weight"]).view(B, T, 3, H, hd)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            if cache is not None:
                cache[0][l][:, :, past_len:past_len + T] = k
                cache[1][l][:, :, past_len:past_len + T] = v
                k = cache[0][l][:, :, :past_len + T]
                v = cache[1][l][:, :, :past_len + T]
            o = causal_attention(q, k, v, past_len).transpose(1, 2).reshape(B * T, self.D)
            x = x + torch.addmm(p["attn.c_proj.bias"], o, p["attn.c_proj.weight"]).view(B, T, self.D)
            h = F.layer_norm(x, (self.D,), p["ln_2.weight"], p["ln_2.bias"], self.eps)
            u = F.gelu(torch.addmm(p["mlp.c_fc.bias"], h.reshape(B * T, self.D), p["mlp.c_fc.weight"]), approximate="tanh")
            x = x + torch.addmm(p["mlp.c_proj.bias"], u, p["mlp.c_proj.weight"]).view(B, T, self.D)
        x = F.layer_norm(x, (self.D,), self.lnf_w, self.lnf_b, self.eps)
        if last_only:
            x = x[:, -1:]
        return F.linear(x, self.head)


class Llama(torch.nn.Module):
    def __init__(self, cfg, w):
        super().__init__()
        self.L, self.D = cfg["num_hidden_layers"], cfg["hidden_size"]
        self.H = cfg["num_attention_heads"]
        self.kv_heads = cfg.get("num_key_value_heads", self.H)
        self.head_dim = cfg.get("head_dim", self.D // self.H)
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        theta = cfg.get("rope_theta", 10000.0)
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        self.embed = w["model.embed_tokens.weight"]
        self.head = w.get("lm_head.weight", self.embed)
        self.norm = w["model.norm.weight"]
        self.layers = []
        for l in range(self.L):
            p = f"model.layers.{l}."
            self.layers.append({k: w[p + k] for k in ["input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]})

    def rms(self, x, wt):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * wt

    def rope(self, x, pos):
        # x [B, H, T, D]; HF rotate_half convention (pairs i, i + D/2)
        ang = pos.float().unsqueeze(-1) * self.inv_freq  # [B, T, D/2]
        cos = torch.cat([ang.cos(), ang.cos()], -1).unsqueeze(1).to(x.dtype)
        sin = torch.cat([ang.sin(), ang.sin()], -1).unsqueeze(1).to(x.dtype)
        h = x.shape[-1] // 2
        rot = torch.cat([-x[..., h:], x[..., :h]], -1)
        return x * cos + rot * sin

    def forward(self, ids, pos, cache=None, past_len=0, last_only=False):
        B, T = ids.shape
        H, KV, hd = self.H, self.kv_heads, self.head_dim
        x = self.embed[ids]
        for l, p in enumerate(self.layers):
            h = self.rms(x, p["input_layernorm.weight"])
            q = F.linear(h, p["self_attn.q_proj.weight"]).view(B, T, H, hd).transpose(1, 2)
            k = F.linear(h, p["self_attn.k_proj.weight"]).view(B, T, KV, hd).transpose(1, 2)
            v = F.linear(h, p["self_attn.v_proj.weight"]).view(B, T, KV, hd).transpose(1, 2)
            q, k = self.rope(q, pos), self.rope(k, pos)
            if cache is not None:
                cache[0][l][:, :, past_len:past_len + T] = k
                cache[1][l][:, :, past_len:past_len + T] = v
                k = cache[0][l][:, :, :past_len + T]
                v = cache[1][l][:, :, :past_len + T]
            if KV != H:
                k = k.repeat_interleave(H // KV, dim=1)
                v = v.repeat_interleave(H // KV, dim=1)
            o = causal_attention(q, k, v, past_len).transpose(1, 2).reshape(B, T, H * hd)
            x = x + F.linear(o, p["self_attn.o_proj.weight"])
            h = self.rms(x, p["post_attention_layernorm.weight"])
            x = x + F.linear(F.silu(F.linear(h, p["mlp.gate_proj.weight"])) * F.linear(h, p["mlp.up_proj.weight"]), p["mlp.down_proj.weight"])
        x = self.rms(x, self.norm)
        if last_only:
            x = x[:, -1:]
        return F.linear(x, self.head)


def build(d):
    cfg, w = load_checkpoint(d)
    mt = cfg.get("model_type")
    m = GPT2(cfg, w) if mt == "gpt2" else Llama(cfg, w)
    dtype = next(iter(w.values())).dtype
    return cfg, m, dtype


def new_cache(m, B, max_len, dtype):
    shape = (B, m.kv_heads, max_len, m.head_dim)
    return ([torch.zeros(shape, dtype=dtype) for _ in range(m.L)], [torch.zeros(shape, dtype=dtype) for _ in range(m.L)])


# ------------------------------------------------------------------ timing
def peak_rss_mib():
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def summarize(ts):
    s = sorted(ts)
    n = len(s)
    med = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return med, s[0], sum(ts) / n, n


def ids_for(vocab, B, S, seed):
    return [[3 + ((seed * 7919 + b * 104729 + t * 7927) % min(vocab - 3, 5000)) for t in range(S)] for b in range(B)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--name", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", default="1x128")
    ap.add_argument("--decode", action="store_true")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    name = a.name or os.path.basename(a.dir.rstrip("/"))
    cmd = " ".join(f"{k}={os.environ[k]}" for k in ["GOMP_SPINCOUNT", "OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS"] if k in os.environ)
    cmd = (cmd + " " if cmd else "") + " ".join(["/usr/bin/python3"] + sys.argv)

    def emit(d):
        d.update({"peer": "torch", "torch": torch.__version__, "model": name, "threads": a.threads, "command": cmd, "peak_rss_mib": peak_rss_mib()})
        print(json.dumps(d), flush=True)

    t0 = time.perf_counter()
    cfg, m, dtype = build(a.dir)
    emit({"bench": "models.load", "shape": None, "ms": round((time.perf_counter() - t0) * 1e3, 1), "weights_dtype": str(dtype).replace("torch.", "")})
    vocab = cfg["vocab_size"]
    with torch.inference_mode():
        for spec in [s for s in a.prefill.split(",") if s]:
            B, S = (int(v) for v in spec.split("x"))
            ids = torch.tensor(ids_for(vocab, B, S, 1))
            pos = torch.arange(S).unsqueeze(0).expand(B, S)
            m(ids, pos)  # warm-up
            ts = []
            for _ in range(a.reps):
                t = time.perf_counter()
                logits = m(ids, pos)
                ts.append((time.perf_counter() - t) * 1e3)
                del logits
            med, best, mean, n = summarize(ts)
            emit({"bench": "models.prefill", "shape": [B, S], "ms": round(med, 2), "best_ms": round(best, 2), "reps": n, "tokens_per_s": round(B * S / med * 1e3, 1), "logits": "full [B, T, V]"})
        if a.decode:
            P = 128
            prompt = torch.tensor(ids_for(vocab, 1, P, 2))
            ppos = torch.arange(P).unsqueeze(0)

            def run_decode():
                cache = new_cache(m, 1, P + a.steps + 1, dtype)
                logits = m(prompt, ppos, cache, 0, last_only=True)
                ts = []
                for s in range(a.steps):
                    tok = int(logits[0, -1].argmax())
                    t = time.perf_counter()
                    logits = m(torch.tensor([[tok]]), torch.tensor([[P + s]]), cache, P + s, last_only=True)
                    _ = int(logits[0, -1].argmax())  # the pick the next step needs, as generation does
                    ts.append((time.perf_counter() - t) * 1e3)
                return ts

            run_decode()  # warm-up
            ts = []
            for _ in range(max(1, min(a.reps, 3))):
                ts += run_decode()
            med, best, mean, n = summarize(ts)
            emit({"bench": "models.decode", "shape": [1, 1], "context": [P, P + a.steps], "ms": round(med, 3), "best_ms": round(best, 3), "mean_ms": round(mean, 3), "reps": n, "tokens_per_s": round(1e3 / med, 2)})


if __name__ == "__main__":
    main()
