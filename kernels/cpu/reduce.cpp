// reduce.cpp: reductions along one dim, cumsum, softmax / log_softmax (contract in reduce.h).
//
// Shapes: x [..., n, ...] (n = x.shape[dim]); reduce writes out with out.shape[dim] == 1 (ARGMAX /
// ARGMIN into I64), cumsum / softmax write out with x's shape. Any dtype and strides.
//
// ref::*  one line (all elements along `dim` for one index of the other dims) at a time through
//         load_f32/load_i64; floats accumulate in DOUBLE (a sharper oracle than the f32 the
//         contract promises), ints in int64 with wrap-around. MAX/MIN/ARG*: NaN wins (PyTorch),
//         ties keep the first index. MAX/MIN/ARGMAX/ARGMIN of an empty dim throw Error{BAD_INPUT}.
// fast::* float inputs only (ints and PROD go to ref):
//   reduce  - lines contiguous along dim (or converted in kBlock chunks when strided / bf16 / f16):
//             AVX-512 with 4x16 f32 partial sums per chunk, chunk sums combined in double, so the
//             error grows like (kBlock / 64 + n / kBlock) ulp instead of n ulp. When dim is not the
//             innermost dim but the dims inside it are contiguous ([R, D] summed over R), columns are
//             accumulated in blocks of kBlock lanes instead. Threads split lines / column blocks.
//   cumsum  - running sum in double (PyTorch's CPU accumulate type for f32), lines in parallel; the
//             column-blocked form for inner-contiguous layouts. Same arithmetic as ref: equal results.
//   softmax - last-dim-contiguous rows (the attention case): max, then exp(x - max) (simd::v_exp,
//             max 0.94 ulp) summed in f32 lanes, then a scale by 1/sum
//             (log_softmax: (x - max) - log(sum)); rows split across threads. Other layouts: ref.
//
// Bench: build/nx_ops_bench (bench/cpp/ops_bench.cpp: softmax), or `node bench/kernels.mjs --filter softmax`
// through the addon.
#include "reduce.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#define NX_RD_AVX512 NX_SIMD_AVX512DQ  // AVX-512 F/BW/VL/DQ

namespace nx {
namespace {

int norm_dim(int dim, int ndim) { return dim < 0 ? dim + ndim : dim; }

// Lines along `dim`: the index space of every other dim, with x's and out's offsets for each line.
struct Lines {
  int nd = 0;
  int64_t shape[kMaxDims];
  int64_t sx[kMaxDims], so[kMaxDims];
  int64_t count = 1;
  int64_t n = 1;            // length along dim
  int64_t x_step = 0, o_step = 0;  // strides along dim
  void offsets(int64_t l, int64_t* ox, int64_t* oo) const {
    int64_t a = 0, b = 0;
    for (int d = nd - 1; d >= 0 && l > 0; d--) {
      int64_t i = l % shape[d];
      l /= shape[d];
      a += i * sx[d];
      b += i * so[d];
    }
    *ox = a;
    *oo = b;
  }
};

Lines make_lines(const KView& x, int dim, const KView& out) {
  Lines ln;
  if (x.ndim == 0) return ln;  // a 0-d tensor is one line of one element
  ln.n = x.shape[dim];
  ln.x_step = x.strides[dim];
  ln.o_step = out.strides[dim];
  for (int d = 0; d < x.ndim; d++) {
    if (d == dim || x.shape[d] == 1) continue;
    ln.shape[ln.nd] = x.shape[d];
    ln.sx[ln.nd] = x.strides[d];
    ln.so[ln.nd] = out.strides[d];
    ln.count *= x.shape[d];
    ln.nd++;
  }
  return ln;
}

}  // namespace

// =============================================================================================
// ref
// =============================================================================================
namespace ref {

void reduce(ReduceOp op, const KView& x, int dim, const KView& out) {
  dim = norm_dim(dim, x.ndim);
  const Lines ln = make_lines(x, dim, out);
  const int64_t n = ln.n;
  const bool arg = op == ReduceOp::ARGMAX || op == ReduceOp::ARGMIN;
  if (n == 0 && op != ReduceOp::SUM && op != ReduceOp::MEAN && op != ReduceOp::PROD)
    throw Error("BAD_INPUT", "max / min / argmax / argmin of an empty dimension");
  const bool fl = dtype_is_float(x.dtype);
  for (int64_t l = 0; l < ln.count; l++) {
    int64_t ox, oo;
    ln.offsets(l, &ox, &oo);
    if (arg) {
      int64_t best = 0;
      double bv = load_f32(x.data, x.dtype, ox);
      int64_t bi = load_i64(x.data, x.dtype, ox);
      for (int64_t k = 1; k < n && !(fl && std::isnan(bv)); k++) {
        int64_t o = ox + k * ln.x_step;
        bool better;
        if (fl) {
          double v = load_f32(x.data, x.dtype, o);
          better = std::isnan(v) || (op == ReduceOp::ARGMAX ? v > bv : v < bv);
          if (better) bv = v;
        } else {
          int64_t v = load_i64(x.data, x.dtype, o);
          better = op == ReduceOp::ARGMAX ? v > bi : v < bi;
          if (better) bi = v;
        }
        if (better) best = k;
      }
      store_i64(out.data, out.dtype, oo, best);
    } else if (fl) {
      double acc = op == ReduceOp::PROD ? 1.0 : (op == ReduceOp::MAX || op == ReduceOp::MIN) ? load_f32(x.data, x.dtype, ox) : 0.0;
      for (int64_t k = 0; k < n; k++) {
        double v = load_f32(x.data, x.dtype, ox + k * ln.x_step);
        switch (op) {
          case ReduceOp::SUM: case ReduceOp::MEAN: acc += v; break;
          case ReduceOp::PROD: acc *= v; break;
          case ReduceOp::MAX: acc = (std::isnan(acc) || std::isnan(v)) ? NAN : std::max(acc, v); break;
          case ReduceOp::MIN: acc = (std::isnan(acc) || std::isnan(v)) ? NAN : std::min(acc, v); break;
          default: break;
        }
      }
      if (op == ReduceOp::MEAN) acc /= static_cast<double>(n);  // n == 0: 0/0 = NaN (PyTorch)
      store_f32(out.data, out.dtype, oo, static_cast<float>(acc));
    } else {
      using U = uint64_t;
      int64_t acc = op == ReduceOp::PROD ? 1 : (op == ReduceOp::MAX || op == ReduceOp::MIN) ? load_i64(x.data, x.dtype, ox) : 0;
      for (int64_t k = 0; k < n; k++) {
        int64_t v = load_i64(x.data, x.dtype, ox + k * ln.x_step);
        switch (op) {
          case ReduceOp::SUM: case ReduceOp::MEAN: acc = static_cast<int64_t>(static_cast<U>(acc) + static_cast<U>(v)); break;
          case ReduceOp::PROD: acc = static_cast<int64_t>(static_cast<U>(acc) * static_cast<U>(v)); break;
          case ReduceOp::MAX: acc = std::max(acc, v); break;
          case ReduceOp::MIN: acc = std::min(acc, v); break;
          default: break;
        }
      }
      if (op == ReduceOp::MEAN)
        store_f32(out.data, out.dtype, oo, static_cast<float>(static_cast<double>(acc) / static_cast<double>(n)));
      else
        store_i64(out.data, out.dtype, oo, acc);
    }
  }
}

void cumsum(const KView& x, int dim, const KView& out) {
  dim = norm_dim(dim, x.ndim);
  const Lines ln = make_lines(x, dim, out);
  const bool fl = dtype_is_float(x.dtype) || dtype_is_float(out.dtype);
  for (int64_t l = 0; l < ln.count; l++) {
    int64_t ox, oo;
    ln.offsets(l, &ox, &oo);
    double accf = 0;
    uint64_t acci = 0;
    for (int64_t k = 0; k < ln.n; k++) {
      if (fl) {
        accf += load_f32(x.data, x.dtype, ox + k * ln.x_step);
        store_f32(out.data, out.dtype, oo + k * ln.o_step, static_cast<float>(accf));
      } else {
        acci += static_cast<uint64_t>(load_i64(x.data, x.dtype, ox + k * ln.x_step));
        store_i64(out.data, out.dtype, oo + k * ln.o_step, static_cast<int64_t>(acci));
      }
    }
  }
}

void softmax(const KView& x, int dim, bool log, const KView& out) {
  dim = norm_dim(dim, x.ndim);
  const Lines ln = make_lines(x, dim, out);
  for (int64_t l = 0; l < ln.count; l++) {
    int64_t ox, oo;
    ln.offsets(l, &ox, &oo);
    double m = -INFINITY;
    for (int64_t k = 0; k < ln.n; k++) {
      double v = load_f32(x.data, x.dtype, ox + k * ln.x_step);
      m = (std::isnan(m) || std::isnan(v)) ? NAN : std::max(m, v);
    }
    double s = 0;
    for (int64_t k = 0; k < ln.n; k++) s += std::exp(load_f32(x.data, x.dtype, ox + k * ln.x_step) - m);
    for (int64_t k = 0; k < ln.n; k++) {
      double d = load_f32(x.data, x.dtype, ox + k * ln.x_step) - m;
      double r = log ? d - std::log(s) : std::exp(d) / s;
      store_f32(out.data, out.dtype, oo + k * ln.o_step, static_cast<float>(r));
    }
  }
}

}  // namespace ref

// =============================================================================================
// fast
// =============================================================================================
namespace {

constexpr int64_t kBlock = 512;  // f32 elements per conversion / accumulation chunk

// ---- conversions between any float storage + stride and f32, vector exp: simd.h ----
#if NX_RD_AVX512
using simd::tail_mask;
using simd::v_exp;
#endif
using simd::load_block;
using simd::store_block;

// f32 pointer to m elements at (off, stride): in place for contiguous f32, else converted into buf.
const float* chunk(const KView& v, int64_t off, int64_t stride, int64_t m, float* buf) {
  if (v.dtype == DType::F32 && stride == 1) return v.ptr<const float>() + off;
  load_block(v, off, stride, m, buf);
  return buf;
}

// ---- chunk kernels over f32 ----
// max (is_max) or min of a chunk; NaN if any element is NaN.
float extreme_chunk(const float* p, int64_t m, bool is_max) {
#if NX_RD_AVX512
  const __m512 fillv = _mm512_set1_ps(is_max ? -INFINITY : INFINITY);
  __m512 acc = fillv;
  __mmask16 nan = 0;
  for (int64_t i = 0; i < m; i += 16) {
    __m512 v = _mm512_mask_loadu_ps(fillv, tail_mask(std::min<int64_t>(16, m - i)), p + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    acc = is_max ? _mm512_max_ps(acc, v) : _mm512_min_ps(acc, v);
  }
  if (nan) return NAN;
  return is_max ? _mm512_reduce_max_ps(acc) : _mm512_reduce_min_ps(acc);
#else
  float acc = is_max ? -INFINITY : INFINITY;
  for (int64_t i = 0; i < m; i++) {
    if (std::isnan(p[i])) return NAN;
    acc = is_max ? std::max(acc, p[i]) : std::min(acc, p[i]);
  }
  return acc;
#endif
}

// First index of value v in the chunk (v is not NaN; -0 == +0).
int64_t find_chunk(const float* p, int64_t m, float v) {
  int64_t i = 0;
#if NX_RD_AVX512
  const __m512 vv = _mm512_set1_ps(v);
  for (; i < m; i += 16) {
    __mmask16 live = tail_mask(std::min<int64_t>(16, m - i));
    __mmask16 hit = _mm512_mask_cmp_ps_mask(live, _mm512_maskz_loadu_ps(live, p + i), vv, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(static_cast<unsigned>(hit));
  }
#endif
  for (; i < m; i++)
    if (p[i] == v) return i;
  return -1;
}
int64_t find_nan_chunk(const float* p, int64_t m) {
  for (int64_t i = 0; i < m; i++)
    if (std::isnan(p[i])) return i;
  return -1;
}

// Reduces one line (x at off with stride, n elements) to a float or an index.
void reduce_line(ReduceOp op, const KView& x, int64_t off, int64_t stride, int64_t n, float* buf, double* val,
                 int64_t* idx) {
  const bool arg = op == ReduceOp::ARGMAX || op == ReduceOp::ARGMIN;
  const bool is_max = op == ReduceOp::MAX || op == ReduceOp::ARGMAX;
  double total = 0;
  float ext = is_max ? -INFINITY : INFINITY;
  int64_t best = -1;
  for (int64_t j = 0; j < n; j += kBlock) {
    int64_t m = std::min(kBlock, n - j);
    const float* p = chunk(x, off + j * stride, stride, m, buf);
    if (op == ReduceOp::SUM || op == ReduceOp::MEAN) {
      total += simd::sum_f32(p, m);
      continue;
    }
    float e = extreme_chunk(p, m, is_max);
    if (std::isnan(e)) {
      if (!arg) { *val = NAN; return; }
      *idx = j + find_nan_chunk(p, m);
      return;
    }
    if (best < 0 || (is_max ? e > ext : e < ext)) {
      ext = e;
      best = arg ? j + find_chunk(p, m, e) : 0;
    }
  }
  if (op == ReduceOp::SUM) *val = total;
  else if (op == ReduceOp::MEAN) *val = total / static_cast<double>(n);
  else *val = ext;
  *idx = best;
}

template <typename Fn>
void for_lines(const Lines& ln, int64_t work_per_line, Fn&& fn) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_line));
  parallel_for(0, ln.count, grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> buf(static_cast<size_t>(kBlock));
    for (int64_t l = lo; l < hi; l++) {
      int64_t ox, oo;
      ln.offsets(l, &ox, &oo);
      fn(ox, oo, buf.data());
    }
  });
}

// Column-blocked form: the innermost remaining dim is contiguous in x and out and `dim` is outside
// it. Calls fn(ox, oo, m) for groups of m <= kBlock adjacent lines, in parallel.
bool inner_contiguous(const Lines& ln) {
  return ln.nd >= 1 && ln.sx[ln.nd - 1] == 1 && ln.so[ln.nd - 1] == 1 && ln.x_step != 1 && ln.n > 1;
}
template <typename Fn>
void for_column_blocks(const Lines& ln, Fn&& fn) {
  const int64_t inner = ln.shape[ln.nd - 1];
  const int64_t nblk = (inner + kBlock - 1) / kBlock;
  const int64_t groups = ln.count / inner * nblk;
  const int64_t grain = std::max<int64_t>(1, 32768 / (kBlock * ln.n));
  parallel_for(0, groups, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t g = lo; g < hi; g++) {
      int64_t outer = g / nblk, c0 = (g % nblk) * kBlock;
      int64_t ox, oo;
      ln.offsets(outer * inner, &ox, &oo);
      fn(ox + c0, oo + c0, std::min(kBlock, inner - c0));
    }
  });
}

}  // namespace

namespace fast {

void reduce(ReduceOp op, const KView& x, int dim, const KView& out) {
  dim = norm_dim(dim, x.ndim);
  if (!dtype_is_float(x.dtype) || op == ReduceOp::PROD || x.ndim == 0 || x.shape[dim] == 0 || x.numel() == 0)
    return ref::reduce(op, x, dim, out);
  const Lines ln = make_lines(x, dim, out);
  const bool arg = op == ReduceOp::ARGMAX || op == ReduceOp::ARGMIN;
  if (!arg && inner_contiguous(ln)) {
    const bool is_max = op == ReduceOp::MAX;
    for_column_blocks(ln, [&](int64_t ox, int64_t oo, int64_t m) {
      alignas(64) float acc[kBlock], row[kBlock];
      double dacc[kBlock];
      const bool sum = op == ReduceOp::SUM || op == ReduceOp::MEAN;
      const float* p0 = chunk(x, ox, 1, m, row);
      if (sum) {
        // rows summed in f32 in blocks of 64, blocks combined in double (bounded error growth)
        for (int64_t i = 0; i < m; i++) dacc[i] = 0;
        for (int64_t k0 = 0; k0 < ln.n; k0 += 64) {
          for (int64_t i = 0; i < m; i++) acc[i] = 0;
          for (int64_t k = k0; k < std::min(ln.n, k0 + 64); k++) {
            const float* p = chunk(x, ox + k * ln.x_step, 1, m, row);
            for (int64_t i = 0; i < m; i++) acc[i] += p[i];
          }
          for (int64_t i = 0; i < m; i++) dacc[i] += acc[i];
        }
        for (int64_t i = 0; i < m; i++)
          acc[i] = static_cast<float>(op == ReduceOp::MEAN ? dacc[i] / static_cast<double>(ln.n) : dacc[i]);
      } else {
        std::memcpy(acc, p0, static_cast<size_t>(m) * 4);
        for (int64_t k = 1; k < ln.n; k++) {
          const float* p = chunk(x, ox + k * ln.x_step, 1, m, row);
          for (int64_t i = 0; i < m; i++) {
            float a = acc[i], v = p[i];
            // NaN sticks: a NaN accumulator stays, a NaN input replaces
            acc[i] = (a != a) ? a : (v != v) ? v : (is_max ? (v > a ? v : a) : (v < a ? v : a));
          }
        }
      }
      store_block(acc, m, out, oo, 1);
    });
    return;
  }
  for_lines(ln, ln.n, [&](int64_t ox, int64_t oo, float* buf) {
    double v = 0;
    int64_t idx = 0;
    reduce_line(op, x, ox, ln.x_step, ln.n, buf, &v, &idx);
    if (arg)
      store_i64(out.data, out.dtype, oo, idx);
    else
      store_f32(out.data, out.dtype, oo, static_cast<float>(v));
  });
}

void cumsum(const KView& x, int dim, const KView& out) {
  dim = norm_dim(dim, x.ndim);
  if (!dtype_is_float(x.dtype) || !dtype_is_float(out.dtype) || x.ndim == 0 || x.numel() == 0)
    return ref::cumsum(x, dim, out);
  const Lines ln = make_lines(x, dim, out);
  if (inner_contiguous(ln) && ln.o_step != 1) {
    for_column_blocks(ln, [&](int64_t ox, int64_t oo, int64_t m) {
      alignas(64) float row[kBlock], res[kBlock];
      double acc[kBlock];
      for (int64_t i = 0; i < m; i++) acc[i] = 0;
      for (int64_t k = 0; k < ln.n; k++) {
        const float* p = chunk(x, ox + k * ln.x_step, 1, m, row);
        for (int64_t i = 0; i < m; i++) {
          acc[i] += p[i];
          res[i] = static_cast<float>(acc[i]);
        }
        store_block(res, m, out, oo + k * ln.o_step, 1);
      }
    });
    return;
  }
  for_lines(ln, ln.n, [&](int64_t ox, int64_t oo, float* buf) {
    double acc = 0;
    alignas(64) float res[kBlock];
    for (int64_t j = 0; j < ln.n; j += kBlock) {
      int64_t m = std::min(kBlock, ln.n - j);
      const float* p = chunk(x, ox + j * ln.x_step, ln.x_step, m, buf);
      for (int64_t i = 0; i < m; i++) {
        acc += p[i];
        res[i] = static_cast<float>(acc);
      }
      store_block(res, m, out, oo + j * ln.o_step, ln.o_step);
    }
  });
}

void softmax(const KView& x, int dim, bool log, const KView& out) {
  dim = norm_dim(dim, x.ndim);
  if (!dtype_is_float(x.dtype) || !dtype_is_float(out.dtype) || x.ndim == 0 || x.numel() == 0)
    return ref::softmax(x, dim, log, out);
  const Lines ln = make_lines(x, dim, out);
  const int64_t n = ln.n;
  if (!((ln.x_step == 1 || n == 1) && (ln.o_step == 1 || n == 1))) return ref::softmax(x, dim, log, out);
  const int64_t grain = std::max<int64_t>(1, 16384 / n);
  parallel_for(0, ln.count, grain, [&](int64_t lo, int64_t hi) {
    // whole rows in f32: x converted (when not f32) into xr, results built in orow
    std::vector<float> xbuf(x.dtype == DType::F32 ? 0 : static_cast<size_t>(n));
    std::vector<float> obuf(out.dtype == DType::F32 ? 0 : static_cast<size_t>(n));
    for (int64_t l = lo; l < hi; l++) {
      int64_t ox, oo;
      ln.offsets(l, &ox, &oo);
      const float* xr = x.dtype == DType::F32 ? x.ptr<const float>() + ox : xbuf.data();
      if (x.dtype != DType::F32) load_block(x, ox, 1, n, xbuf.data());
      float* orow = out.dtype == DType::F32 ? out.ptr<float>() + oo : obuf.data();
#if NX_RD_AVX512
      // pass 1: max (a NaN anywhere makes the sum NaN below, hence every output NaN, as in ref)
      __m512 vm = _mm512_set1_ps(-INFINITY);
      int64_t i = 0;
      for (; i + 16 <= n; i += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(xr + i));
      if (i < n) vm = _mm512_max_ps(vm, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail_mask(n - i), xr + i));
      const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vm));
      // pass 2: e = exp(x - max), summed (and stored for softmax)
      __m512 s0 = _mm512_setzero_ps(), s1 = s0;
      for (i = 0; i + 32 <= n; i += 32) {
        __m512 e0 = v_exp(_mm512_sub_ps(_mm512_loadu_ps(xr + i), mx));
        __m512 e1 = v_exp(_mm512_sub_ps(_mm512_loadu_ps(xr + i + 16), mx));
        s0 = _mm512_add_ps(s0, e0);
        s1 = _mm512_add_ps(s1, e1);
        if (!log) {
          _mm512_storeu_ps(orow + i, e0);
          _mm512_storeu_ps(orow + i + 16, e1);
        }
      }
      for (; i < n; i += 16) {
        __mmask16 m = tail_mask(std::min<int64_t>(16, n - i));
        __m512 e = _mm512_maskz_mov_ps(m, v_exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, xr + i), mx)));
        s0 = _mm512_add_ps(s0, e);
        if (!log) _mm512_mask_storeu_ps(orow + i, m, e);
      }
      const float sum = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
      // pass 3
      if (log) {
        const __m512 ls = _mm512_set1_ps(std::log(sum));
        for (i = 0; i < n; i += 16) {
          __mmask16 m = tail_mask(std::min<int64_t>(16, n - i));
          __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, xr + i), mx);
          _mm512_mask_storeu_ps(orow + i, m, _mm512_sub_ps(d, ls));
        }
      } else {
        const __m512 inv = _mm512_set1_ps(1.0f / sum);
        for (i = 0; i < n; i += 16) {
          __mmask16 m = tail_mask(std::min<int64_t>(16, n - i));
          _mm512_mask_storeu_ps(orow + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, orow + i), inv));
        }
      }
#else
      float mxs = -INFINITY;
      for (int64_t i = 0; i < n; i++) mxs = std::max(mxs, xr[i]);
      float sum = 0;
      for (int64_t i = 0; i < n; i++) {
        float e = std::exp(xr[i] - mxs);
        sum += e;
        if (!log) orow[i] = e;
      }
      if (log) {
        const float ls = std::log(sum);
        for (int64_t i = 0; i < n; i++) orow[i] = (xr[i] - mxs) - ls;
      } else {
        const float inv = 1.0f / sum;
        for (int64_t i = 0; i < n; i++) orow[i] *= inv;
      }
#endif
      if (out.dtype != DType::F32) store_block(obuf.data(), n, out, oo, 1);
    }
  });
}

}  // namespace fast
}  // namespace nx
