// attention.h: rotary position embeddings and causal attention with a KV cache and grouped-query heads.
//
// rope: x [B, T, H, D] (any strides, float dtype), pos [B, T] (I32 or I64 absolute positions),
//   inv_freq [R/2] f32 (R = rotary dims, R <= D, the first R dims rotate, the rest pass through).
//   angle = pos * inv_freq[i]. interleaved=true rotates adjacent pairs (2i, 2i+1) (llama2.c / GPT-J);
//   interleaved=false rotates (i, i + R/2) (HF rotate_half). out: x's shape.
// attention: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] (Tk >= Tq, Hq % Hkv == 0, query head h uses kv head
//   h / (Hq / Hkv)), any strides. Query i sits at key position Tk - Tq + i and attends keys j <= that
//   (causal). mask: nullptr or [B, Tk] (any dtype; nonzero = attend, 0 = padding key). A query row that
//   can attend no key outputs zeros. scale multiplies q.k (usually 1/sqrt(D)).
//   out: [B, Hq, Tq, D] f32, any strides. Softmax in f32 with max subtraction.
//
// Bench: build/nx_attention_bench (bench/cpp/attention_bench.cpp); `node bench/kernels.mjs --filter rope`
// and `--filter attention` through the addon.
#pragma once
#include "../common.h"

namespace nx {
namespace ref {
void rope(const KView& x, const KView& pos, const KView& inv_freq, bool interleaved, const KView& out);
void attention(const KView& q, const KView& k, const KView& v, const KView* mask, float scale, const KView& out);
}  // namespace ref
namespace fast {
void rope(const KView& x, const KView& pos, const KView& inv_freq, bool interleaved, const KView& out);
void attention(const KView& q, const KView& k, const KView& v, const KView* mask, float scale, const KView& out);
}  // namespace fast
}  // namespace nx
