// reduce.cu: reductions along one dim, cumsum, softmax / log_softmax on the GPU.
// Contract: kernels/cpu/reduce.h; reference: nx::ref in kernels/cpu/reduce.cpp.
//
// A "line" is every element along `dim` for one index of the other dims (as in the reference).
//   reduce:  one block per line; each thread folds a strided share of the line, then a shared-memory
//            tree combines the threads. Floats accumulate in DOUBLE (as the reference; only the order of
//            the additions differs), ints in int64 with wrap-around (exact in any order). MAX / MIN /
//            ARGMAX / ARGMIN: NaN wins, ties keep the lowest index (the reference's first occurrence).
//   cumsum:  one thread per line, a sequential running sum in double / uint64: the reference's exact
//            arithmetic, so results are identical.
//   softmax: one block per line: the max (NaN propagates), then sum of expf(x - max) accumulated in
//            double, then exp(x - max) / sum (or (x - max) - log(sum)) rounded once.
#include <cmath>

#include "common.cuh"

namespace nx {
namespace cuda {

namespace {

constexpr int kRB = 256;  // threads per block for line reductions (a power of two)

// A candidate for ARGMAX / ARGMIN: floats compare as (nan, f) with NaN above everything, ints as exact
// int64 values; ties go to the lower index; idx < 0 means "no candidate".
struct Key {
  bool nan;
  double f;
  long long i;
  long long idx;
};
__device__ inline bool key_better(const Key& c, const Key& b, bool fl, bool is_max) {
  if (c.idx < 0) return false;
  if (b.idx < 0) return true;
  if (fl) {
    if (c.nan != b.nan) return c.nan;
    if (!c.nan && c.f != b.f) return is_max ? c.f > b.f : c.f < b.f;
  } else if (c.i != b.i) {
    return is_max ? c.i > b.i : c.i < b.i;
  }
  return c.idx < b.idx;
}

__device__ inline double fold_f(ReduceOp op, double acc, double v) {
  switch (op) {
    case ReduceOp::SUM: case ReduceOp::MEAN: return acc + v;
    case ReduceOp::PROD: return acc * v;
    case ReduceOp::MAX: return (isnan(acc) || isnan(v)) ? NAN : (acc > v ? acc : v);
    case ReduceOp::MIN: return (isnan(acc) || isnan(v)) ? NAN : (acc < v ? acc : v);
    default: return acc;
  }
}
__device__ inline int64_t fold_i(ReduceOp op, int64_t acc, int64_t v) {
  using U = unsigned long long;
  switch (op) {
    case ReduceOp::SUM: case ReduceOp::MEAN: return static_cast<int64_t>(static_cast<U>(acc) + static_cast<U>(v));
    case ReduceOp::PROD: return static_cast<int64_t>(static_cast<U>(acc) * static_cast<U>(v));
    case ReduceOp::MAX: return acc > v ? acc : v;
    case ReduceOp::MIN: return acc < v ? acc : v;
    default: return acc;
  }
}

__global__ void reduce_kernel(ReduceOp op, Lines ln, KView x, KView o) {
  __shared__ double sd[kRB];
  __shared__ long long si[kRB];
  __shared__ bool sn[kRB];
  __shared__ long long sx[kRB];
  const int t = threadIdx.x;
  const bool fl = dtype_is_float(x.dtype);
  const bool arg = op == ReduceOp::ARGMAX || op == ReduceOp::ARGMIN;
  const bool is_max = op == ReduceOp::ARGMAX;
  const int64_t n = ln.n;
  for (int64_t l = blockIdx.x; l < ln.count; l += gridDim.x) {
    int64_t ox, oo;
    offsets_of(l, ln.nd, ln.shape, ln.sx, &ox, ln.so, &oo);
    if (arg) {
      Key best{false, 0.0, 0, -1};
      for (int64_t k = t; k < n; k += kRB) {
        Key c{false, 0.0, 0, k};
        const int64_t off = ox + k * ln.x_step;
        if (fl) {
          const float f = load_f32(x.data, x.dtype, off);
          c.nan = isnan(f);
          c.f = c.nan ? 0.0 : static_cast<double>(f);
        } else {
          c.i = load_i64(x.data, x.dtype, off);
        }
        if (key_better(c, best, fl, is_max)) best = c;
      }
      sn[t] = best.nan;
      sd[t] = best.f;
      si[t] = best.i;
      sx[t] = best.idx;
      __syncthreads();
      for (int s = kRB / 2; s > 0; s >>= 1) {
        if (t < s) {
          const Key a{sn[t], sd[t], si[t], sx[t]}, b{sn[t + s], sd[t + s], si[t + s], sx[t + s]};
          if (key_better(b, a, fl, is_max)) {
            sn[t] = b.nan;
            sd[t] = b.f;
            si[t] = b.i;
            sx[t] = b.idx;
          }
        }
        __syncthreads();
      }
      if (t == 0) store_i64(o.data, o.dtype, oo, sx[0] < 0 ? 0 : sx[0]);
      __syncthreads();
    } else if (fl) {
      const bool mm = op == ReduceOp::MAX || op == ReduceOp::MIN;
      double acc = op == ReduceOp::PROD ? 1.0 : 0.0;
      bool have = false;
      for (int64_t k = t; k < n; k += kRB) {
        const double v = load_f32(x.data, x.dtype, ox + k * ln.x_step);
        if (mm && !have) {
          acc = v;
          have = true;
        } else {
          acc = fold_f(op, acc, v);
        }
      }
      sd[t] = acc;
      sn[t] = have || !mm;
      __syncthreads();
      for (int s = kRB / 2; s > 0; s >>= 1) {
        if (t < s && sn[t + s]) {
          sd[t] = sn[t] ? fold_f(op, sd[t], sd[t + s]) : sd[t + s];
          sn[t] = true;
        }
        __syncthreads();
      }
      if (t == 0) {
        double r = sd[0];
        if (op == ReduceOp::MEAN) r /= static_cast<double>(n);
        store_f32(o.data, o.dtype, oo, static_cast<float>(r));
      }
      __syncthreads();
    } else {
      const bool mm = op == ReduceOp::MAX || op == ReduceOp::MIN;
      int64_t acc = op == ReduceOp::PROD ? 1 : 0;
      bool have = false;
      for (int64_t k = t; k < n; k += kRB) {
        const int64_t v = load_i64(x.data, x.dtype, ox + k * ln.x_step);
        if (mm && !have) {
          acc = v;
          have = true;
        } else {
          acc = fold_i(op, acc, v);
        }
      }
      si[t] = acc;
      sn[t] = have || !mm;
      __syncthreads();
      for (int s = kRB / 2; s > 0; s >>= 1) {
        if (t < s && sn[t + s]) {
          si[t] = sn[t] ? fold_i(op, si[t], si[t + s]) : si[t + s];
          sn[t] = true;
        }
        __syncthreads();
      }
      if (t == 0) {
        if (op == ReduceOp::MEAN)
          store_f32(o.data, o.dtype, oo, static_cast<float>(static_cast<double>(si[0]) / static_cast<double>(n)));
        else
          store_i64(o.data, o.dtype, oo, si[0]);
      }
      __syncthreads();
    }
  }
}

__global__ void cumsum_kernel(Lines ln, KView x, KView o, bool fl) {
  NX_CUDA_LOOP(l, ln.count) {
    int64_t ox, oo;
    offsets_of(l, ln.nd, ln.shape, ln.sx, &ox, ln.so, &oo);
    double accf = 0;
    unsigned long long acci = 0;
    for (int64_t k = 0; k < ln.n; k++) {
      if (fl) {
        accf += load_f32(x.data, x.dtype, ox + k * ln.x_step);
        store_f32(o.data, o.dtype, oo + k * ln.o_step, static_cast<float>(accf));
      } else {
        acci += static_cast<unsigned long long>(load_i64(x.data, x.dtype, ox + k * ln.x_step));
        store_i64(o.data, o.dtype, oo + k * ln.o_step, static_cast<int64_t>(acci));
      }
    }
  }
}

__global__ void softmax_kernel(Lines ln, KView x, KView o, bool lg) {
  __shared__ double sd[kRB];
  const int t = threadIdx.x;
  for (int64_t l = blockIdx.x; l < ln.count; l += gridDim.x) {
    int64_t ox, oo;
    offsets_of(l, ln.nd, ln.shape, ln.sx, &ox, ln.so, &oo);
    // max (NaN propagates)
    float m = -INFINITY;
    for (int64_t k = t; k < ln.n; k += kRB) {
      const float v = load_f32(x.data, x.dtype, ox + k * ln.x_step);
      m = (isnan(m) || isnan(v)) ? NAN : fmaxf(m, v);
    }
    sd[t] = m;
    __syncthreads();
    for (int s = kRB / 2; s > 0; s >>= 1) {
      if (t < s) {
        const double a = sd[t], b = sd[t + s];
        sd[t] = (isnan(a) || isnan(b)) ? NAN : (a > b ? a : b);
      }
      __syncthreads();
    }
    const float mx = static_cast<float>(sd[0]);
    __syncthreads();
    double sum = 0;
    for (int64_t k = t; k < ln.n; k += kRB)
      sum += expf(__fsub_rn(load_f32(x.data, x.dtype, ox + k * ln.x_step), mx));
    sd[t] = sum;
    __syncthreads();
    for (int s = kRB / 2; s > 0; s >>= 1) {
      if (t < s) sd[t] += sd[t + s];
      __syncthreads();
    }
    const double total = sd[0];
    const double lsum = log(total);
    for (int64_t k = t; k < ln.n; k += kRB) {
      const float d = __fsub_rn(load_f32(x.data, x.dtype, ox + k * ln.x_step), mx);
      const double r = lg ? static_cast<double>(d) - lsum : static_cast<double>(expf(d)) / total;
      store_f32(o.data, o.dtype, oo + k * ln.o_step, static_cast<float>(r));
    }
    __syncthreads();
  }
}

int norm_dim(int dim, int ndim) { return dim < 0 ? dim + ndim : dim; }

}  // namespace

void reduce(ReduceOp op, const KView& x, int dim, const KView& out) {
  dim = norm_dim(dim, x.ndim);
  const Lines ln = make_lines(x, dim, out);
  if (ln.count == 0) return;
  if (ln.n == 0 && op != ReduceOp::SUM && op != ReduceOp::MEAN && op != ReduceOp::PROD)
    throw Error("BAD_INPUT", "max / min / argmax / argmin of an empty dimension");
  reduce_kernel<<<grid_rows(ln.count), kRB, 0, stream()>>>(op, ln, x, out);
  check_launch("reduce");
}

void cumsum(const KView& x, int dim, const KView& out) {
  dim = norm_dim(dim, x.ndim);
  const Lines ln = make_lines(x, dim, out);
  if (ln.count == 0 || ln.n == 0) return;
  const bool fl = dtype_is_float(x.dtype) || dtype_is_float(out.dtype);
  cumsum_kernel<<<grid_for(ln.count), kBlock, 0, stream()>>>(ln, x, out, fl);
  check_launch("cumsum");
}

void softmax(const KView& x, int dim, bool log, const KView& out) {
  dim = norm_dim(dim, x.ndim);
  const Lines ln = make_lines(x, dim, out);
  if (ln.count == 0 || ln.n == 0) return;
  softmax_kernel<<<grid_rows(ln.count), kRB, 0, stream()>>>(ln, x, out, log);
  check_launch("softmax");
}

}  // namespace cuda
}  // namespace nx
