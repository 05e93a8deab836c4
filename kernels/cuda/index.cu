// index.cu: embedding, gather, scatter, index_select and top-k on the GPU.
// Contract: kernels/cpu/index.h; reference: nx::ref in kernels/cpu/index.cpp.
//
// Indices are validated first, on the device: a check kernel flags the smallest linear position holding
// an out-of-range index (atomicMin into the per-device slot, see common.cuh); the host waits for it
// (one stream sync per op) and throws Error{"INDEX"} with the reference's message, naming the first
// bad index in row-major order, before anything is written. Then one thread per element moves values
// (bit-exact when dtypes agree, through f32 / int64 otherwise, like the reference's copy_elem).
// scatter: with repeated indices the reference lets the last write in row-major order win; here a thread
//   skips its write when a later position along `dim` (same other coordinates) holds the same index,
//   so exactly that last write happens and the result does not depend on thread timing.
// topk: one block per row, k selection passes: pass j finds the best element that comes after the
//   (j-1)-th pick in the reference's total order (value descending, NaN first, ties by lower index) with
//   a block reduction. O(k * n / 256) per row: fine for sampling-sized k, slow for k near n.
#include <string>

#include "common.cuh"

namespace nx {
namespace cuda {

namespace {

[[noreturn]] void throw_index(const char* op, int64_t id, int64_t lo, int64_t hi) {
  throw Error("INDEX", std::string(op) + ": id " + std::to_string(id) + " out of range [" + std::to_string(lo) + ", " +
                           std::to_string(hi) + ")");
}

// Flags positions of `index` (any shape) whose value is outside [lo, hi).
__global__ void check_kernel(KView index, int64_t lo, int64_t hi, int64_t n, long long* bad) {
  NX_CUDA_LOOP(i, n) {
    int64_t off;
    offsets_of(i, index.ndim, index.shape, index.strides, &off);
    const int64_t v = load_i64(index.data, index.dtype, off);
    if (v < lo || v >= hi) report_bad(bad, i);
  }
}

void check_indices(const char* op, const KView& index, int64_t lo, int64_t hi) {
  const int64_t n = index.numel();
  if (n == 0) return;
  bad_reset();
  check_kernel<<<grid_for(n), kBlock, 0, stream()>>>(index, lo, hi, n, bad_slot());
  check_launch(op);
  const long long first = bad_first();
  if (first != kNoBad) throw_index(op, read_index_at(index, first), lo, hi);
}

__global__ void embedding_kernel(KView w, KView ids, KView o, int64_t rows, int64_t D) {
  NX_CUDA_LOOP(g, rows * D) {
    const int64_t r = g / D, d = g % D;
    int64_t idx[kMaxDims];
    unravel(r, ids.ndim, ids.shape, idx);
    const int64_t id = load_i64(ids.data, ids.dtype, dot_idx(ids.ndim, idx, ids.strides));
    const int64_t oo = dot_idx(ids.ndim, idx, o.strides) + d * o.strides[o.ndim - 1];
    store_f32(o.data, o.dtype, oo, load_f32(w.data, w.dtype, id * w.strides[0] + d * w.strides[1]));
  }
}

// Offset in v of multi-index idx with idx[dim] replaced by at.
__device__ inline int64_t offset_at(const KView& v, const int64_t* idx, int dim, int64_t at) {
  int64_t o = 0;
#pragma unroll
  for (int i = 0; i < kMaxDims; i++)
    if (i < v.ndim) o += (i == dim ? at : idx[i]) * v.strides[i];
  return o;
}

__global__ void gather_kernel(KView x, int dim, KView index, KView o, int64_t n) {
  NX_CUDA_LOOP(g, n) {
    int64_t idx[kMaxDims];
    unravel(g, index.ndim, index.shape, idx);
    const int64_t id = load_i64(index.data, index.dtype, dot_idx(index.ndim, idx, index.strides));
    copy_elem(x.data, x.dtype, offset_at(x, idx, dim, id), o.data, o.dtype, dot_idx(o.ndim, idx, o.strides));
  }
}

__global__ void scatter_kernel(KView dst, int dim, KView index, KView src, int64_t n) {
  NX_CUDA_LOOP(g, n) {
    int64_t idx[kMaxDims];
    unravel(g, index.ndim, index.shape, idx);
    const int64_t id = load_i64(index.data, index.dtype, dot_idx(index.ndim, idx, index.strides));
    // the last write in row-major order wins: skip when a later position along dim repeats this index
    bool later = false;
    for (int64_t k = idx[dim] + 1; k < index.shape[dim] && !later; k++)
      later = load_i64(index.data, index.dtype, offset_at(index, idx, dim, k)) == id;
    if (later) continue;
    copy_elem(src.data, src.dtype, dot_idx(src.ndim, idx, src.strides), dst.data, dst.dtype, offset_at(dst, idx, dim, id));
  }
}

__global__ void index_select_kernel(KView x, int dim, KView index, KView o, int64_t n, int64_t size) {
  NX_CUDA_LOOP(g, n) {
    int64_t idx[kMaxDims];
    unravel(g, o.ndim, o.shape, idx);
    int64_t id = load_i64(index.data, index.dtype, idx[dim] * index.strides[0]);
    if (id < 0) id += size;
    copy_elem(x.data, x.dtype, offset_at(x, idx, dim, id), o.data, o.dtype, dot_idx(o.ndim, idx, o.strides));
  }
}

// ---- topk ----
constexpr int kTB = 256;
struct TKey {
  bool nan;
  double v;
  long long i;  // -1: none
};
// a before b in the reference's order (larger first, NaN largest, ties: lower index first)
__device__ inline bool before(const TKey& a, const TKey& b) {
  if (a.nan != b.nan) return a.nan;
  if (!a.nan && a.v != b.v) return a.v > b.v;
  return a.i < b.i;
}

__global__ void topk_kernel(KView x, int64_t k, KView vals, KView inds, int64_t rows) {
  __shared__ bool sn[kTB];
  __shared__ double sv[kTB];
  __shared__ long long si[kTB];
  const int t = threadIdx.x;
  const int nd = x.ndim;
  const int64_t n = x.shape[nd - 1];
  const bool fl = dtype_is_float(x.dtype);
  int64_t lead[kMaxDims];
#pragma unroll
  for (int i = 0; i < kMaxDims; i++) lead[i] = i < nd ? (i == nd - 1 ? 1 : x.shape[i]) : 1;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    int64_t idx[kMaxDims];
    unravel(r, nd, lead, idx);
    const int64_t xo = dot_idx(nd, idx, x.strides), vo = dot_idx(nd, idx, vals.strides),
                  io = dot_idx(nd, idx, inds.strides);
    const int64_t xs = x.strides[nd - 1];
    TKey prev{false, 0.0, -1};
    for (int64_t j = 0; j < k; j++) {
      TKey best{false, 0.0, -1};
      for (int64_t e = t; e < n; e += kTB) {
        TKey c;
        c.i = e;
        if (fl) {
          const float f = load_f32(x.data, x.dtype, xo + e * xs);
          c.nan = isnan(f);
          c.v = c.nan ? 0.0 : static_cast<double>(f);
        } else {
          c.nan = false;
          c.v = static_cast<double>(load_i64(x.data, x.dtype, xo + e * xs));  // exact for |v| < 2^53 (as the reference)
        }
        if (prev.i >= 0 && !before(prev, c)) continue;  // already picked (or ahead of the last pick)
        if (best.i < 0 || before(c, best)) best = c;
      }
      sn[t] = best.nan;
      sv[t] = best.v;
      si[t] = best.i;
      __syncthreads();
      for (int s = kTB / 2; s > 0; s >>= 1) {
        if (t < s && si[t + s] >= 0) {
          const TKey a{sn[t], sv[t], si[t]}, b{sn[t + s], sv[t + s], si[t + s]};
          if (a.i < 0 || before(b, a)) {
            sn[t] = b.nan;
            sv[t] = b.v;
            si[t] = b.i;
          }
        }
        __syncthreads();
      }
      prev = TKey{sn[0], sv[0], si[0]};
      if (t == 0 && prev.i >= 0) {
        copy_elem(x.data, x.dtype, xo + prev.i * xs, vals.data, vals.dtype, vo + j * vals.strides[nd - 1]);
        store_i64(inds.data, inds.dtype, io + j * inds.strides[nd - 1], prev.i);
      }
      __syncthreads();
    }
  }
}

}  // namespace

void embedding(const KView& weight, const KView& ids, const KView& out) {
  const int64_t V = weight.shape[0], D = weight.shape[1];
  check_indices("embedding", ids, 0, V);
  const int64_t rows = ids.numel();
  if (rows == 0 || D == 0) return;
  embedding_kernel<<<grid_for(rows * D), kBlock, 0, stream()>>>(weight, ids, out, rows, D);
  check_launch("embedding");
}

void gather(const KView& x, int dim, const KView& index, const KView& out) {
  if (dim < 0) dim += x.ndim;
  check_indices("gather", index, 0, x.shape[dim]);
  const int64_t n = index.numel();
  if (n == 0) return;
  gather_kernel<<<grid_for(n), kBlock, 0, stream()>>>(x, dim, index, out, n);
  check_launch("gather");
}

void scatter(const KView& dst, int dim, const KView& index, const KView& src) {
  if (dim < 0) dim += dst.ndim;
  check_indices("scatter", index, 0, dst.shape[dim]);
  const int64_t n = index.numel();
  if (n == 0) return;
  scatter_kernel<<<grid_for(n), kBlock, 0, stream()>>>(dst, dim, index, src, n);
  check_launch("scatter");
}

void index_select(const KView& x, int dim, const KView& index, const KView& out) {
  if (dim < 0) dim += x.ndim;
  const int64_t size = x.shape[dim];
  check_indices("index_select", index, -size, size);
  const int64_t n = out.numel();
  if (n == 0) return;
  index_select_kernel<<<grid_for(n), kBlock, 0, stream()>>>(x, dim, index, out, n, size);
  check_launch("index_select");
}

void topk(const KView& x, int64_t k, const KView& values, const KView& indices) {
  const int nd = x.ndim;
  if (nd == 0 || k == 0) return;
  const int64_t rows = x.numel() / (x.shape[nd - 1] > 0 ? x.shape[nd - 1] : 1);
  if (x.numel() == 0) return;
  topk_kernel<<<grid_rows(rows), kTB, 0, stream()>>>(x, k, values, indices, rows);
  check_launch("topk");
}

}  // namespace cuda
}  // namespace nx
