// reduce.h: reductions along one dimension, cumulative sum, softmax and log-softmax.
//
// reduce: out has x's rank with out.shape[dim] == 1. SUM/MEAN/MAX/MIN/PROD accumulate floats in f32
// (SUM/MEAN use pairwise or Kahan-free blocked summation; the tolerance in the conformance suite says
// which) and ints in int64; ARGMAX/ARGMIN write I64 indices (first occurrence wins on ties, NaN counts
// as the maximum like PyTorch).
// cumsum: out has x's shape.
// softmax / log_softmax: along `dim`, max-subtracted, f32 math; out has x's shape.
//
// Bench: build/nx_ops_bench (bench/cpp/ops_bench.cpp: softmax); `node bench/kernels.mjs --filter softmax`
// through the addon.
#pragma once
#include "../common.h"

namespace nx {

enum class ReduceOp : int32_t { SUM, MEAN, MAX, MIN, PROD, ARGMAX, ARGMIN };

namespace ref {
void reduce(ReduceOp op, const KView& x, int dim, const KView& out);
void cumsum(const KView& x, int dim, const KView& out);
void softmax(const KView& x, int dim, bool log, const KView& out);
}  // namespace ref
namespace fast {
void reduce(ReduceOp op, const KView& x, int dim, const KView& out);
void cumsum(const KView& x, int dim, const KView& out);
void softmax(const KView& x, int dim, bool log, const KView& out);
}  // namespace fast
}  // namespace nx
