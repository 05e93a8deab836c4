// gemm.h: matrix multiply, the kernel that dominates prefill (GEMM) and decode (matrix-vector).
//
//   out[M,N] = a[M,K] @ b[K,N] (+ bias[N])
//
// a: f32, any 2-D strides (fast path: rows contiguous, stride(1) == 1).
// b: f32, bf16 or f16, any 2-D strides. Two layouts are fast: row-major [K,N] (stride(1) == 1, GPT-2
//    Conv1D weights) and "transposed" [K,N] with stride(0) == 1 (an nn.Linear weight [N,K] viewed
//    through .t(), the Llama case). bf16/f16 are widened to f32 on the fly (weights never double).
// bias: nullptr or an [N] view of f32/bf16/f16.
// out: f32, any strides (fast path: rows contiguous). out must not alias a or b.
// Accumulation is in f32. M == 1 (decode) takes a matrix-vector path bound by weight bandwidth.
//
// Bench: build/nx_gemm_bench (source bench/cpp/gemm_bench.cpp; OpenBLAS side by side) or
// `node bench/kernels.mjs --filter gemm` through the addon; one JSON line per result.
#pragma once
#include "../common.h"

namespace nx {
namespace ref {
void gemm(const KView& a, const KView& b, const KView* bias, const KView& out);
}
namespace fast {
void gemm(const KView& a, const KView& b, const KView* bias, const KView& out);
}
}  // namespace nx
