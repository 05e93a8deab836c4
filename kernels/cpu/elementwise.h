// elementwise.h: unary and binary elementwise math, casts and fills over strided views.
//
// Binary ops: `a` and `b` arrive already broadcast to out's shape (core expands them with stride-0
// dims), so every view has out's rank and sizes. Float math runs in f32 whatever the storage dtype
// (f16/bf16 inputs are widened, results rounded to out's dtype); integer dtypes (i32, i64) compute in
// int64 (DIV on integers truncates toward zero, like C). Comparisons write BOOL (0/1) outputs.
// Unary float ops read any dtype as f32 and write out's dtype.
// cast: copies x into out converting dtype (also the plain strided copy when dtypes agree).
// fill: sets every element of out to value (converted to out's dtype).
// where: out = cond ? a : b (cond BOOL; all views broadcast to out's shape).
//
// Bench: build/nx_ops_bench (bench/cpp/ops_bench.cpp: add, gelu). `node bench/kernels.mjs` runs kernel
// benches through the addon.
#pragma once
#include "../common.h"

namespace nx {

enum class BinaryOp : int32_t { ADD, SUB, MUL, DIV, POW, MAXIMUM, MINIMUM, EQ, NE, LT, LE, GT, GE };
enum class UnaryOp : int32_t {
  NEG, ABS, EXP, LOG, SQRT, RSQRT, RELU, GELU_TANH, GELU_ERF, SILU, TANH, SIGMOID, SIN, COS, SQUARE,
  RECIPROCAL
};

namespace ref {
void binary(BinaryOp op, const KView& a, const KView& b, const KView& out);
void unary(UnaryOp op, const KView& x, const KView& out);
void cast(const KView& x, const KView& out);
void fill(const KView& out, double value);
void where(const KView& cond, const KView& a, const KView& b, const KView& out);
}  // namespace ref
namespace fast {
void binary(BinaryOp op, const KView& a, const KView& b, const KView& out);
void unary(UnaryOp op, const KView& x, const KView& out);
void cast(const KView& x, const KView& out);
void fill(const KView& out, double value);
void where(const KView& cond, const KView& a, const KView& b, const KView& out);
// o[i] = op(x[i]) for i < n over dense f32 (o may be x), on the calling thread: the same per-element
// code fast::unary runs on dense f32 rows (every element, tail included, takes the same vector path),
// so an epilogue that calls it (gemm_packed's fused activation) is bit-identical to a separate op.
void unary_f32(UnaryOp op, const float* x, float* o, int64_t n);
}  // namespace fast
}  // namespace nx
