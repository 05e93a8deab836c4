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
//
// Prepacked weights (the pack_weight / linear_packed ops). A weight multiplied by many inputs (every
// linear layer of a model) can be packed ONCE into the panel layout the GEMM micro-kernel reads, so no
// call packs B again: P = ceil(N / W) panels (W = packed_width(): the micro-tile width NR, 48 with
// AVX-512, 16 AVX2, 8 SSE2, 4 scalar), panel j holding columns [j*W, j*W + W) for every k:
//
//   packed[(j * K + k) * W + c] = b[k, j * W + c]   (f32 whatever b's dtype; columns past N are 0)
//
// gemm_packed(a, packed, N, bias, residual, act, out) computes out = residual + act(a @ b + bias)
// (residual [M,N] or nullptr; added last with one f32 add, the same bits as an add op): M > 8 reads every panel
// straight from memory (prefetching the next one) instead of packing it; M <= 8 (decode) streams the
// panels once through the same micro-kernel. Every row of out is computed by the same sequence of
// operations whatever M and the thread count (the K blocks, then the bias, in one order), so batched
// and unbatched results agree bit for bit. act (Epilogue) is applied to finished out tiles with the
// unary op's own per-element code (fast::unary_f32), so the fusion changes no bits either.
// out must not alias a or packed; a may have any strides and any float dtype.
#pragma once
#include "../common.h"

namespace nx {

enum class Epilogue : int32_t { NONE = 0, GELU_TANH = 1, GELU_ERF = 2 };

int64_t packed_width();                          // W above (this build's NR)
int64_t packed_numel(int64_t K, int64_t N);      // floats of the packed form of a [K,N] weight
// out[..., k] = b[k, ids[...]]: columns of a packed [K,N] weight, i.e. rows of the embedding table a
// tied LM head (b = E.t(), E [N,K]) was packed from, so lookups need not touch E's mapped pages again.
// ids I32/I64 of any shape and strides, each in [0, N) (else Error INDEX, before anything is written);
// out [...ids.shape, K] of a float dtype, any strides.
void packed_columns(const float* packed, int64_t K, int64_t N, const KView& ids, const KView& out);

namespace ref {
void gemm(const KView& a, const KView& b, const KView* bias, const KView& out);
void pack_weight(const KView& b, float* dst);    // dst: packed_numel(K, N) floats
void gemm_packed(const KView& a, const float* packed, int64_t N, const KView* bias, const KView* residual, Epilogue act,
                 const KView& out);
}  // namespace ref
namespace fast {
void gemm(const KView& a, const KView& b, const KView* bias, const KView& out);
void pack_weight(const KView& b, float* dst);    // dst 64-byte aligned
void gemm_packed(const KView& a, const float* packed, int64_t N, const KView* bias, const KView* residual, Epilogue act,
                 const KView& out);
}  // namespace fast
}  // namespace nx
