// op-table.h: every op the runtime executes, declared once.
//
//   NX_OP(ENUM, "name", min_inputs, max_inputs, FAMILY)
//
// This X-macro generates the C++ enum `nx::Op`, the name table, and (through scripts/gen-ops.mjs) the
// TS file ts/src/tensor/op-names.gen.ts, so both sides agree on op ids. Inputs beyond min_inputs are
// optional (JS passes null). Ops whose name ends in "_" write into their first input in place.
// Attributes travel as a list of numbers; their meaning per family is documented in ops.cpp.
#pragma once
#include <cstdint>

#define NX_OP_TABLE(NX_OP)                              \
  /* binary elementwise: (a, b) already broadcast to one shape */ \
  NX_OP(ADD, "add", 2, 2, BINARY)                       \
  NX_OP(SUB, "sub", 2, 2, BINARY)                       \
  NX_OP(MUL, "mul", 2, 2, BINARY)                       \
  NX_OP(DIV, "div", 2, 2, BINARY)                       \
  NX_OP(POW, "pow", 2, 2, BINARY)                       \
  NX_OP(MAXIMUM, "maximum", 2, 2, BINARY)               \
  NX_OP(MINIMUM, "minimum", 2, 2, BINARY)               \
  NX_OP(EQ, "eq", 2, 2, BINARY)                         \
  NX_OP(NE, "ne", 2, 2, BINARY)                         \
  NX_OP(LT, "lt", 2, 2, BINARY)                         \
  NX_OP(LE, "le", 2, 2, BINARY)                         \
  NX_OP(GT, "gt", 2, 2, BINARY)                         \
  NX_OP(GE, "ge", 2, 2, BINARY)                         \
  /* unary elementwise: (x) */                          \
  NX_OP(NEG, "neg", 1, 1, UNARY)                        \
  NX_OP(ABS, "abs", 1, 1, UNARY)                        \
  NX_OP(EXP, "exp", 1, 1, UNARY)                        \
  NX_OP(LOG, "log", 1, 1, UNARY)                        \
  NX_OP(SQRT, "sqrt", 1, 1, UNARY)                      \
  NX_OP(RSQRT, "rsqrt", 1, 1, UNARY)                    \
  NX_OP(RELU, "relu", 1, 1, UNARY)                      \
  NX_OP(GELU_TANH, "gelu_tanh", 1, 1, UNARY)            \
  NX_OP(GELU, "gelu", 1, 1, UNARY)                      \
  NX_OP(SILU, "silu", 1, 1, UNARY)                      \
  NX_OP(TANH, "tanh", 1, 1, UNARY)                      \
  NX_OP(SIGMOID, "sigmoid", 1, 1, UNARY)                \
  NX_OP(SIN, "sin", 1, 1, UNARY)                        \
  NX_OP(COS, "cos", 1, 1, UNARY)                        \
  NX_OP(SQUARE, "square", 1, 1, UNARY)                  \
  NX_OP(RECIPROCAL, "reciprocal", 1, 1, UNARY)          \
  /* data movement */                                   \
  NX_OP(CAST, "cast", 1, 1, MOVE)          /* [dtype] */\
  NX_OP(COPY_, "copy_", 2, 2, MOVE)        /* (dst, src) src broadcast to dst */ \
  NX_OP(FILL_, "fill_", 1, 1, MOVE)        /* [value] */\
  NX_OP(RANDN_, "randn_", 1, 1, MOVE)      /* [seed, mean, std] */ \
  NX_OP(WHERE, "where", 3, 3, MOVE)        /* (cond, a, b) broadcast */ \
  /* reductions along one dim (kept as size 1): [dim] */\
  NX_OP(SUM, "sum", 1, 1, REDUCE)                       \
  NX_OP(MEAN, "mean", 1, 1, REDUCE)                     \
  NX_OP(MAX, "max", 1, 1, REDUCE)                       \
  NX_OP(MIN, "min", 1, 1, REDUCE)                       \
  NX_OP(PROD, "prod", 1, 1, REDUCE)                     \
  NX_OP(ARGMAX, "argmax", 1, 1, REDUCE)                 \
  NX_OP(ARGMIN, "argmin", 1, 1, REDUCE)                 \
  NX_OP(CUMSUM, "cumsum", 1, 1, SCAN)      /* [dim] */  \
  NX_OP(SOFTMAX, "softmax", 1, 1, SCAN)    /* [dim] */  \
  NX_OP(LOG_SOFTMAX, "log_softmax", 1, 1, SCAN) /* [dim] */ \
  /* transformer kernels */                             \
  NX_OP(RMSNORM, "rmsnorm", 1, 2, NORM)    /* (x, weight?) [eps] */ \
  NX_OP(LAYERNORM, "layernorm", 1, 3, NORM) /* (x, weight?, bias?) [eps] */ \
  NX_OP(MATMUL, "matmul", 2, 3, LINALG)    /* (a [..,M,K], b [..,K,N], bias? [N]) */ \
  NX_OP(ROPE, "rope", 3, 3, LINALG)        /* (x [B,T,H,D], pos [B,T], inv_freq [R/2]) [interleaved] */ \
  NX_OP(ATTENTION, "attention", 3, 4, LINALG) /* (q, k, v, mask?) [scale] */ \
  NX_OP(PACK_WEIGHT, "pack_weight", 1, 1, LINALG) /* (w [K,N]) [release] -> [P,K,W] (gemm.h) */ \
  NX_OP(LINEAR_PACKED, "linear_packed", 2, 4, LINALG) /* (a [M,K], packed [P,K,W], bias? [N], residual? [M,N]) [N, act] */ \
  /* indexing */                                        \
  NX_OP(EMBEDDING, "embedding", 2, 2, INDEX) /* (weight [V,D], ids) or [V] (packed [P,D,W], ids) */ \
  NX_OP(GATHER, "gather", 2, 2, INDEX)     /* (x, index) [dim] */ \
  NX_OP(SCATTER_, "scatter_", 3, 3, INDEX) /* (dst, index, src) [dim] */ \
  NX_OP(INDEX_SELECT, "index_select", 2, 2, INDEX) /* (x, index) [dim] */ \
  NX_OP(TOPK, "topk", 1, 1, INDEX)         /* (x) [k] -> (values, indices) */

namespace nx {

enum class Op : int32_t {
#define NX_OP_ENUM(e, name, lo, hi, fam) e,
  NX_OP_TABLE(NX_OP_ENUM)
#undef NX_OP_ENUM
  COUNT
};

struct OpInfo {
  const char* name;
  int min_inputs;
  int max_inputs;
  const char* family;
};

const OpInfo& op_info(Op op);

}  // namespace nx
