// index.cpp: embedding lookup, gather, scatter, index_select and top-k.
//
// embedding:    weight [V, D] f32/bf16/f16, ids [...] I32/I64 -> out [..., D] (float dtype).
// gather:       out[.., i, ..] = x[.., index[.., i, ..], ..] along dim (torch.gather); index/out same shape.
// scatter:      dst[.., index[.., i, ..], ..] = src[.., i, ..] along dim, in place (torch.scatter_); with
//               repeated indices the last write in row-major order of index wins.
// index_select: out[.., j, ..] = x[.., index[j], ..] along dim; negative indices count from the end.
// topk:         k largest along the last dim, sorted descending, ties -> lower index first; NaN counts
//               as larger than every number (as in torch). values in x's dtype, indices I64.
// Errors: any index out of range throws Error{"INDEX"} naming the index and the range, before anything
// is written (indices are validated first), and never from inside a pool task.
//
// ref::  plain loops over any dtypes and strides (the test oracle).
// fast:: embedding/index_select copy whole rows (memcpy when dtypes agree and rows are dense, a
//        vector-friendly widening loop for bf16/f16 -> f32), parallel over rows; topk keeps a small
//        sorted buffer per row (one compare per element when k << n), parallel over rows; gather and
//        scatter delegate to ref (rarely hot: sampling and loss only).
//
// Bench: none yet (build/nx_ops_bench and `node bench/kernels.mjs` do not cover index ops).
#include "index.h"

#include <algorithm>
#include <string>
#include <vector>

namespace nx {

namespace {

[[noreturn]] void throw_index(const char* op, int64_t id, int64_t lo, int64_t hi) {
  throw Error("INDEX", std::string(op) + ": id " + std::to_string(id) + " out of range [" + std::to_string(lo) +
                           ", " + std::to_string(hi) + ")");
}

// Index values of a view in row-major order.
std::vector<int64_t> read_indices(const KView& index) {
  std::vector<int64_t> r(static_cast<size_t>(index.numel()));
  for_each_index(index.ndim, index.shape, [&](int64_t lin, const int64_t* idx) {
    r[static_cast<size_t>(lin)] = load_i64(index.data, index.dtype, index.offset_of(idx));
  });
  return r;
}
// ... each checked against [0, n) (error names op).
std::vector<int64_t> read_indices_checked(const char* op, const KView& index, int64_t n) {
  std::vector<int64_t> r = read_indices(index);
  for (int64_t v : r)
    if (v < 0 || v >= n) throw_index(op, v, 0, n);
  return r;
}
// ... each in [-n, n), negative ones wrapped to v + n (index_select).
std::vector<int64_t> read_indices_wrapped(const char* op, const KView& index, int64_t n) {
  std::vector<int64_t> r = read_indices(index);
  for (int64_t& v : r) {
    const int64_t w = v < 0 ? v + n : v;
    if (w < 0 || w >= n) throw_index(op, v, -n, n);
    v = w;
  }
  return r;
}

// Element offset in v of multi-index idx with idx[dim] replaced by at.
inline int64_t offset_at(const KView& v, const int64_t* idx, int dim, int64_t at) {
  int64_t o = 0;
  for (int i = 0; i < v.ndim; i++) o += (i == dim ? at : idx[i]) * v.strides[i];
  return o;
}

// Copy one element between views of possibly different dtypes (exact when they agree).
inline void copy_elem(const KView& src, int64_t so, const KView& dst, int64_t dof) {
  if (src.dtype == dst.dtype) {
    const size_t es = dtype_size(src.dtype);
    std::memcpy(static_cast<char*>(dst.data) + dof * static_cast<int64_t>(es),
                static_cast<const char*>(src.data) + so * static_cast<int64_t>(es), es);
  } else if (dtype_is_float(dst.dtype) || dtype_is_float(src.dtype)) {
    store_f32(dst.data, dst.dtype, dof, load_f32(src.data, src.dtype, so));
  } else {
    store_i64(dst.data, dst.dtype, dof, load_i64(src.data, src.dtype, so));
  }
}

// topk order: a before b when a is larger (NaN largest), ties -> lower index first.
struct TopkKey {
  double v;
  bool nan;
  int64_t i;
};
inline bool topk_before(const TopkKey& a, const TopkKey& b) {
  if (a.nan != b.nan) return a.nan;
  if (!a.nan && a.v != b.v) return a.v > b.v;
  return a.i < b.i;
}
inline TopkKey topk_key(const KView& x, int64_t off, int64_t i) {
  TopkKey k;
  if (dtype_is_float(x.dtype)) {
    const float f = load_f32(x.data, x.dtype, off);
    k.nan = std::isnan(f);
    k.v = k.nan ? 0.0 : f;
  } else {
    k.nan = false;
    k.v = static_cast<double>(load_i64(x.data, x.dtype, off));  // exact for |v| < 2^53
  }
  k.i = i;
  return k;
}

}  // namespace

// =====================================================================================================
// Reference kernels
// =====================================================================================================
namespace ref {

void embedding(const KView& weight, const KView& ids, const KView& out) {
  const int64_t V = weight.shape[0], D = weight.shape[1];
  const std::vector<int64_t> id = read_indices_checked("embedding", ids, V);
  // out [..., D]: row lin of out is ids' element lin (row-major)
  for_each_index(ids.ndim, ids.shape, [&](int64_t lin, const int64_t* idx) {
    int64_t oo = 0;
    for (int i = 0; i < ids.ndim; i++) oo += idx[i] * out.strides[i];
    const int64_t wo = id[static_cast<size_t>(lin)] * weight.strides[0];
    for (int64_t d = 0; d < D; d++)
      store_f32(out.data, out.dtype, oo + d * out.strides[out.ndim - 1], load_f32(weight.data, weight.dtype, wo + d * weight.strides[1]));
  });
}

void gather(const KView& x, int dim, const KView& index, const KView& out) {
  if (dim < 0) dim += x.ndim;
  const int64_t n = x.shape[dim];
  const std::vector<int64_t> id = read_indices_checked("gather", index, n);
  for_each_index(index.ndim, index.shape, [&](int64_t lin, const int64_t* idx) {
    copy_elem(x, offset_at(x, idx, dim, id[static_cast<size_t>(lin)]), out, out.offset_of(idx));
  });
}

void scatter(const KView& dst, int dim, const KView& index, const KView& src) {
  if (dim < 0) dim += dst.ndim;
  const int64_t n = dst.shape[dim];
  const std::vector<int64_t> id = read_indices_checked("scatter", index, n);
  for_each_index(index.ndim, index.shape, [&](int64_t lin, const int64_t* idx) {
    copy_elem(src, src.offset_of(idx), dst, offset_at(dst, idx, dim, id[static_cast<size_t>(lin)]));
  });
}

void index_select(const KView& x, int dim, const KView& index, const KView& out) {
  if (dim < 0) dim += x.ndim;
  const int64_t n = x.shape[dim];
  const std::vector<int64_t> id = read_indices_wrapped("index_select", index, n);
  for_each_index(out.ndim, out.shape, [&](int64_t, const int64_t* idx) {
    copy_elem(x, offset_at(x, idx, dim, id[static_cast<size_t>(idx[dim])]), out, out.offset_of(idx));
  });
}

void topk(const KView& x, int64_t k, const KView& values, const KView& indices) {
  const int nd = x.ndim;
  const int64_t n = x.shape[nd - 1];
  std::vector<TopkKey> row(static_cast<size_t>(n));
  // iterate over all leading indices (the last dim collapsed to 1)
  int64_t lead[kMaxDims];
  for (int i = 0; i < nd; i++) lead[i] = i == nd - 1 ? 1 : x.shape[i];
  for_each_index(nd, lead, [&](int64_t, const int64_t* idx) {
    const int64_t xo = x.offset_of(idx), vo = values.offset_of(idx), io = indices.offset_of(idx);
    for (int64_t i = 0; i < n; i++) row[static_cast<size_t>(i)] = topk_key(x, xo + i * x.strides[nd - 1], i);
    std::stable_sort(row.begin(), row.end(), topk_before);
    for (int64_t j = 0; j < k; j++) {
      const int64_t src = row[static_cast<size_t>(j)].i;
      copy_elem(x, xo + src * x.strides[nd - 1], values, vo + j * values.strides[nd - 1]);
      store_i64(indices.data, indices.dtype, io + j * indices.strides[nd - 1], src);
    }
  });
}

}  // namespace ref

// =====================================================================================================
// Fast kernels
// =====================================================================================================
namespace fast {

namespace {

// Copy a row of D elements (strides in elements) from src (dtype st) to dst (dtype dt).
void copy_row(const void* src, DType st, int64_t ss, void* dst, DType dt, int64_t ds, int64_t D) {
  if (st == dt && ss == 1 && ds == 1) {
    std::memcpy(dst, src, static_cast<size_t>(D) * dtype_size(st));
    return;
  }
  if (dt == DType::F32 && ss == 1 && ds == 1) {
    float* o = static_cast<float*>(dst);
    const uint16_t* s = static_cast<const uint16_t*>(src);
    if (st == DType::BF16) {
      for (int64_t d = 0; d < D; d++) o[d] = bf16_to_f32(s[d]);  // shift only: vectorises
      return;
    }
    if (st == DType::F16) {
      for (int64_t d = 0; d < D; d++) o[d] = f16_to_f32(s[d]);
      return;
    }
  }
  const size_t es = dtype_size(st);
  for (int64_t d = 0; d < D; d++) {
    if (st == dt)
      std::memcpy(static_cast<char*>(dst) + d * ds * static_cast<int64_t>(es),
                  static_cast<const char*>(src) + d * ss * static_cast<int64_t>(es), es);
    else
      store_f32(dst, dt, d * ds, load_f32(src, st, d * ss));
  }
}

// Multi-index idx[0..nd) of row-major linear index r over shape.
inline void unravel(int64_t r, int nd, const int64_t* shape, int64_t* idx) {
  for (int i = nd - 1; i >= 0; i--) {
    idx[i] = r % shape[i];
    r /= shape[i];
  }
}

inline void* advance(void* p, DType t, int64_t elems) {
  return static_cast<char*>(p) + elems * static_cast<int64_t>(dtype_size(t));
}

}  // namespace

void embedding(const KView& weight, const KView& ids, const KView& out) {
  const int64_t V = weight.shape[0], D = weight.shape[1];
  const std::vector<int64_t> id = read_indices_checked("embedding", ids, V);  // before any task runs
  const int64_t N = static_cast<int64_t>(id.size());
  if (N == 0 || D == 0) return;
  // output row offsets (out's leading dims follow ids' shape)
  std::vector<int64_t> oo(static_cast<size_t>(N));
  for_each_index(ids.ndim, ids.shape, [&](int64_t lin, const int64_t* idx) {
    int64_t o = 0;
    for (int i = 0; i < ids.ndim; i++) o += idx[i] * out.strides[i];
    oo[static_cast<size_t>(lin)] = o;
  });
  const int64_t od = out.strides[out.ndim - 1];
  parallel_for(0, N, std::max<int64_t>(1, 8192 / D), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; r++)
      copy_row(advance(weight.data, weight.dtype, id[r] * weight.strides[0]), weight.dtype, weight.strides[1],
               advance(out.data, out.dtype, oo[r]), out.dtype, od, D);
  });
}

void gather(const KView& x, int dim, const KView& index, const KView& out) { ref::gather(x, dim, index, out); }

void scatter(const KView& dst, int dim, const KView& index, const KView& src) { ref::scatter(dst, dim, index, src); }

void index_select(const KView& x, int dim, const KView& index, const KView& out) {
  if (dim < 0) dim += x.ndim;
  const int64_t n = x.shape[dim];
  const std::vector<int64_t> id = read_indices_wrapped("index_select", index, n);
  const int nd = x.ndim;
  if (out.numel() == 0) return;
  // rows = all output elements but the last dim (the last dim is copied as a row); when dim is the
  // last dim, rows are single elements.
  const bool last = dim == nd - 1;
  const int64_t D = last ? 1 : x.shape[nd - 1];
  int64_t lead[kMaxDims];
  int64_t rows = 1;
  for (int i = 0; i < nd; i++) {
    lead[i] = (i == nd - 1 && !last) ? 1 : out.shape[i];
    rows *= lead[i];
  }
  parallel_for(0, rows, std::max<int64_t>(1, 8192 / D), [&](int64_t lo, int64_t hi) {
    int64_t idx[kMaxDims];
    for (int64_t r = lo; r < hi; r++) {
      unravel(r, nd, lead, idx);
      int64_t xo = 0, oo = 0;
      for (int i = 0; i < nd; i++) {
        xo += (i == dim ? id[static_cast<size_t>(idx[i])] : idx[i]) * x.strides[i];
        oo += idx[i] * out.strides[i];
      }
      copy_row(advance(x.data, x.dtype, xo), x.dtype, x.strides[nd - 1], advance(out.data, out.dtype, oo), out.dtype,
               out.strides[nd - 1], D);
    }
  });
}

void topk(const KView& x, int64_t k, const KView& values, const KView& indices) {
  const int nd = x.ndim;
  const int64_t n = x.shape[nd - 1];
  if (k <= 0 || x.numel() == 0) return;
  int64_t lead[kMaxDims];
  int64_t rows = 1;
  for (int i = 0; i < nd; i++) {
    lead[i] = i == nd - 1 ? 1 : x.shape[i];
    rows *= lead[i];
  }
  const int64_t xs = x.strides[nd - 1];
  parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, n)), [&](int64_t lo, int64_t hi) {
    std::vector<TopkKey> best;  // sorted by topk_before, at most k entries
    std::vector<TopkKey> all;
    int64_t idx[kMaxDims];
    for (int64_t r = lo; r < hi; r++) {
      unravel(r, nd, lead, idx);
      const int64_t xo = x.offset_of(idx), vo = values.offset_of(idx), io = indices.offset_of(idx);
      best.clear();
      if (k * 16 <= n) {
        // running top-k: an element enters only when it beats the current k-th (one compare usually)
        const float* xf = x.dtype == DType::F32 ? x.ptr<const float>() + xo : nullptr;
        for (int64_t i = 0; i < n; i++) {
          if (xf && static_cast<int64_t>(best.size()) == k) {  // f32 fast reject: not above the k-th
            const float f = xf[i * xs];
            const TopkKey& kth = best.back();
            if (!std::isnan(f) && (kth.nan || static_cast<double>(f) <= kth.v)) continue;
          }
          const TopkKey e = topk_key(x, xo + i * xs, i);
          if (static_cast<int64_t>(best.size()) == k) {
            if (!topk_before(e, best.back())) continue;
            best.pop_back();
          }
          best.insert(std::upper_bound(best.begin(), best.end(), e, topk_before), e);
        }
      } else {
        all.resize(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; i++) all[static_cast<size_t>(i)] = topk_key(x, xo + i * xs, i);
        // topk_before is a strict total order (indices differ), so partial_sort is deterministic
        std::partial_sort(all.begin(), all.begin() + k, all.end(), topk_before);
        best.assign(all.begin(), all.begin() + k);
      }
      for (int64_t j = 0; j < k; j++) {
        const int64_t src = best[static_cast<size_t>(j)].i;
        copy_elem(x, xo + src * xs, values, vo + j * values.strides[nd - 1]);
        store_i64(indices.data, indices.dtype, io + j * indices.strides[nd - 1], src);
      }
    }
  });
}

}  // namespace fast
}  // namespace nx
