// index.h: embedding lookup, gather, scatter (index copy), index_select and top-k.
//
// embedding: weight [V, D] (f32/bf16/f16), ids [...] (I32/I64), out [..., D] (float dtype).
//   An id outside [0, V) throws Error{"INDEX"} naming the id.
// gather: out[..., i, ...] = x[..., index[..., i, ...], ...] along dim (PyTorch torch.gather: index and
//   out have the same shape; x may be larger in every dim but `dim`). Out-of-range -> Error{"INDEX"}.
// scatter: dst[..., index[..., i, ...], ...] = src[..., i, ...] along dim, in place (torch.scatter_).
// index_select: out = x selected along dim at positions index[j] (1-D I32/I64 index; negative
//   counts from the end); out.shape[dim] == index.numel().
// topk: along the last dim, the k largest values (sorted descending; ties keep the lower index first)
//   into values (x's dtype) and indices (I64), both [..., k].
//
// Bench: none of the benches covers these yet (build/nx_ops_bench and build/nx_attention_bench, sources
// bench/cpp/*.cpp, and `node bench/kernels.mjs`, which runs kernel benches through the addon).
#pragma once
#include "../common.h"

namespace nx {
namespace ref {
void embedding(const KView& weight, const KView& ids, const KView& out);
void gather(const KView& x, int dim, const KView& index, const KView& out);
void scatter(const KView& dst, int dim, const KView& index, const KView& src);
void index_select(const KView& x, int dim, const KView& index, const KView& out);
void topk(const KView& x, int64_t k, const KView& values, const KView& indices);
}  // namespace ref
namespace fast {
void embedding(const KView& weight, const KView& ids, const KView& out);
void gather(const KView& x, int dim, const KView& index, const KView& out);
void scatter(const KView& dst, int dim, const KView& index, const KView& src);
void index_select(const KView& x, int dim, const KView& index, const KView& out);
void topk(const KView& x, int64_t k, const KView& values, const KView& indices);
}  // namespace fast
}  // namespace nx
