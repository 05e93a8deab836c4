// norm.h: RMSNorm and LayerNorm over the last dimension.
//
//   rmsnorm:   out = x / sqrt(mean(x^2) + eps) * weight            (Llama; HF computes in f32)
//   layernorm: out = (x - mean) / sqrt(var + eps) * weight + bias  (GPT-2; biased variance)
// x: [..., D] any float dtype and strides; weight/bias: [D] f32/bf16/f16 or nullptr (then 1 / 0);
// out: x's shape, any float dtype.
//
// Bench: build/nx_ops_bench (bench/cpp/ops_bench.cpp: rmsnorm); `node bench/kernels.mjs --filter rmsnorm`
// through the addon.
#pragma once
#include "../common.h"

namespace nx {
namespace ref {
void rmsnorm(const KView& x, const KView* weight, float eps, const KView& out);
void layernorm(const KView& x, const KView* weight, const KView* bias, float eps, const KView& out);
}  // namespace ref
namespace fast {
void rmsnorm(const KView& x, const KView* weight, float eps, const KView& out);
void layernorm(const KView& x, const KView* weight, const KView* bias, float eps, const KView& out);
}  // namespace fast
}  // namespace nx
