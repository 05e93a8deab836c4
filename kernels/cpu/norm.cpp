// norm.cpp: RMSNorm and LayerNorm over the last dim (contract in norm.h).
//
//   rmsnorm:   out = x / sqrt(mean(x^2) + eps) * weight
//   layernorm: out = (x - mean) / sqrt(var + eps) * weight + bias    (biased variance)
// Shapes: x [..., D] (rows = every index of the leading dims), weight / bias [D] or null, out like x.
//
// ref::*  per row in DOUBLE (two-pass mean / variance), rounded once to out's dtype. Test oracle.
// fast::* rows contiguous along D in x and out (leading dims any strides), float dtypes:
//         weight / bias converted once per call to f32 (used in place when already contiguous f32),
//         a bf16 / f16 row converted once into an f32 row buffer; then AVX-512 passes over the row
//         (sum of squares with 4x16 FMA lanes / mean then centred sum of squares, then the scaled
//         write), the row's scale factor computed in double. Rows split across nx::parallel_for
//         (about 16K elements per chunk, so [1, D] decode steps stay single-threaded).
//         Note: HF Llama rounds x * rsqrt(..) to the input dtype BEFORE multiplying by the weight;
//         here everything stays f32 until the single final rounding (the contract's "HF computes
//         in f32"), so bf16 outputs can differ from HF by 1 bf16 ulp.
//         Other layouts (strided last dim) and integer dtypes go to ref.
//
// Bench: build/nx_ops_bench (bench/cpp/ops_bench.cpp: rmsnorm), or `node bench/kernels.mjs --filter rmsnorm`
// through the addon.
#include "norm.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#define NX_NM_AVX512 NX_SIMD_AVX512DQ  // AVX-512 F/BW/VL/DQ

namespace nx {
namespace {

// Rows of x (all dims but the last) with x's and out's offsets for each row.
struct Rows {
  int nd = 0;
  int64_t shape[kMaxDims];
  int64_t sx[kMaxDims], so[kMaxDims];
  int64_t count = 1;
  int64_t D = 1;
  int64_t x_step = 1, o_step = 1;  // strides along D
  void offsets(int64_t r, int64_t* ox, int64_t* oo) const {
    int64_t a = 0, b = 0;
    for (int d = nd - 1; d >= 0 && r > 0; d--) {
      int64_t i = r % shape[d];
      r /= shape[d];
      a += i * sx[d];
      b += i * so[d];
    }
    *ox = a;
    *oo = b;
  }
};

Rows make_rows(const KView& x, const KView& out) {
  Rows rw;
  if (x.ndim == 0) return rw;  // one row of one element
  rw.D = x.shape[x.ndim - 1];
  rw.x_step = x.strides[x.ndim - 1];
  rw.o_step = out.strides[out.ndim - 1];
  for (int d = 0; d < x.ndim - 1; d++) {
    if (x.shape[d] == 1) continue;
    rw.shape[rw.nd] = x.shape[d];
    rw.sx[rw.nd] = x.strides[d];
    rw.so[rw.nd] = out.strides[d];
    rw.count *= x.shape[d];
    rw.nd++;
  }
  return rw;
}

double load_param(const KView* p, int64_t i, double dflt) {
  return p ? static_cast<double>(load_f32(p->data, p->dtype, i * p->strides[0])) : dflt;
}

}  // namespace

// =============================================================================================
// ref
// =============================================================================================
namespace ref {

void rmsnorm(const KView& x, const KView* weight, float eps, const KView& out) {
  const Rows rw = make_rows(x, out);
  for (int64_t r = 0; r < rw.count; r++) {
    int64_t ox, oo;
    rw.offsets(r, &ox, &oo);
    double ss = 0;
    for (int64_t i = 0; i < rw.D; i++) {
      double v = load_f32(x.data, x.dtype, ox + i * rw.x_step);
      ss += v * v;
    }
    double inv = 1.0 / std::sqrt(ss / static_cast<double>(rw.D) + eps);
    for (int64_t i = 0; i < rw.D; i++) {
      double v = load_f32(x.data, x.dtype, ox + i * rw.x_step);
      store_f32(out.data, out.dtype, oo + i * rw.o_step, static_cast<float>(v * inv * load_param(weight, i, 1.0)));
    }
  }
}

void layernorm(const KView& x, const KView* weight, const KView* bias, float eps, const KView& out) {
  const Rows rw = make_rows(x, out);
  for (int64_t r = 0; r < rw.count; r++) {
    int64_t ox, oo;
    rw.offsets(r, &ox, &oo);
    double mean = 0;
    for (int64_t i = 0; i < rw.D; i++) mean += load_f32(x.data, x.dtype, ox + i * rw.x_step);
    mean /= static_cast<double>(rw.D);
    double var = 0;
    for (int64_t i = 0; i < rw.D; i++) {
      double d = load_f32(x.data, x.dtype, ox + i * rw.x_step) - mean;
      var += d * d;
    }
    var /= static_cast<double>(rw.D);
    double inv = 1.0 / std::sqrt(var + eps);
    for (int64_t i = 0; i < rw.D; i++) {
      double d = load_f32(x.data, x.dtype, ox + i * rw.x_step) - mean;
      double v = d * inv * load_param(weight, i, 1.0) + load_param(bias, i, 0.0);
      store_f32(out.data, out.dtype, oo + i * rw.o_step, static_cast<float>(v));
    }
  }
}

}  // namespace ref

// =============================================================================================
// fast
// =============================================================================================
namespace {

#if NX_NM_AVX512
using simd::tail_mask;
#endif
// contiguous rows of any float dtype <-> f32
using simd::load_row;
using simd::store_row;

// sum of (x - c)^2 over a row (c = 0 for rmsnorm), 64 f32 lanes
float sum_sq(const float* x, int64_t n, float c) {
#if NX_NM_AVX512
  const __m512 vc = _mm512_set1_ps(c);
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    __m512 d0 = _mm512_sub_ps(_mm512_loadu_ps(x + i), vc), d1 = _mm512_sub_ps(_mm512_loadu_ps(x + i + 16), vc);
    __m512 d2 = _mm512_sub_ps(_mm512_loadu_ps(x + i + 32), vc), d3 = _mm512_sub_ps(_mm512_loadu_ps(x + i + 48), vc);
    a0 = _mm512_fmadd_ps(d0, d0, a0);
    a1 = _mm512_fmadd_ps(d1, d1, a1);
    a2 = _mm512_fmadd_ps(d2, d2, a2);
    a3 = _mm512_fmadd_ps(d3, d3, a3);
  }
  for (; i < n; i += 16) {
    __mmask16 m = tail_mask(std::min<int64_t>(16, n - i));
    __m512 d = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, x + i), vc);
    a0 = _mm512_fmadd_ps(d, d, a0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#else
  float a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; j++) a[j] += (x[i + j] - c) * (x[i + j] - c);
  for (; i < n; i++) a[0] += (x[i] - c) * (x[i] - c);
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
#endif
}

// o = (x - c) * s * w + b   (w, b may be null: 1 / 0)
void scale_row(const float* x, float c, float s, const float* w, const float* b, float* o, int64_t n) {
#if NX_NM_AVX512
  const __m512 vc = _mm512_set1_ps(c), vs = _mm512_set1_ps(s);
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(n - i);
    __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), vc), vs);
    if (w) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, w + i));
    if (b) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, b + i));
    _mm512_mask_storeu_ps(o + i, m, v);
  }
#else
  for (int64_t i = 0; i < n; i++) {
    float v = (x[i] - c) * s;
    if (w) v *= w[i];
    if (b) v += b[i];
    o[i] = v;
  }
#endif
}

// A [D] parameter as contiguous f32: in place when it already is, else converted into storage.
const float* param_f32(const KView* p, int64_t D, std::vector<float>& storage) {
  if (!p) return nullptr;
  if (p->dtype == DType::F32 && (p->strides[0] == 1 || D == 1)) return p->ptr<const float>();
  storage.resize(static_cast<size_t>(D));
  if (p->strides[0] == 1)
    load_row(p->data, p->dtype, D, storage.data());
  else
    for (int64_t i = 0; i < D; i++) storage[static_cast<size_t>(i)] = load_f32(p->data, p->dtype, i * p->strides[0]);
  return storage.data();
}

bool fast_ok(const KView& x, const KView* w, const KView* b, const KView& out, const Rows& rw) {
  auto fl_param = [](const KView* p) { return !p || dtype_is_float(p->dtype); };
  return x.ndim >= 1 && dtype_is_float(x.dtype) && dtype_is_float(out.dtype) && fl_param(w) && fl_param(b) &&
         (rw.x_step == 1 || rw.D == 1) && (rw.o_step == 1 || rw.D == 1) && rw.D > 0;
}

// Shared driver: fn(xrow f32*, orow f32*) per row, with conversions around it.
template <typename Fn>
void for_rows(const KView& x, const KView& out, const Rows& rw, Fn&& fn) {
  const int64_t D = rw.D;
  const size_t xs = dtype_size(x.dtype), os = dtype_size(out.dtype);
  parallel_for(0, rw.count, std::max<int64_t>(1, 16384 / D), [&](int64_t lo, int64_t hi) {
    std::vector<float> xbuf(x.dtype == DType::F32 ? 0 : static_cast<size_t>(D));
    std::vector<float> obuf(out.dtype == DType::F32 ? 0 : static_cast<size_t>(D));
    for (int64_t r = lo; r < hi; r++) {
      int64_t ox, oo;
      rw.offsets(r, &ox, &oo);
      const void* xp = static_cast<const unsigned char*>(x.data) + ox * static_cast<int64_t>(xs);
      void* op = static_cast<unsigned char*>(out.data) + oo * static_cast<int64_t>(os);
      const float* xr = static_cast<const float*>(xp);
      if (x.dtype != DType::F32) {
        load_row(xp, x.dtype, D, xbuf.data());
        xr = xbuf.data();
      }
      float* orow = out.dtype == DType::F32 ? static_cast<float*>(op) : obuf.data();
      fn(xr, orow);
      if (out.dtype != DType::F32) store_row(obuf.data(), D, op, out.dtype);
    }
  });
}

}  // namespace

namespace fast {

void rmsnorm(const KView& x, const KView* weight, float eps, const KView& out) {
  const Rows rw = make_rows(x, out);
  if (!fast_ok(x, weight, nullptr, out, rw)) return ref::rmsnorm(x, weight, eps, out);
  std::vector<float> wstore;
  const float* w = param_f32(weight, rw.D, wstore);
  const int64_t D = rw.D;
  for_rows(x, out, rw, [&](const float* xr, float* orow) {
    double ms = static_cast<double>(sum_sq(xr, D, 0.0f)) / static_cast<double>(D);
    float inv = static_cast<float>(1.0 / std::sqrt(ms + eps));
    scale_row(xr, 0.0f, inv, w, nullptr, orow, D);
  });
}

void layernorm(const KView& x, const KView* weight, const KView* bias, float eps, const KView& out) {
  const Rows rw = make_rows(x, out);
  if (!fast_ok(x, weight, bias, out, rw)) return ref::layernorm(x, weight, bias, eps, out);
  std::vector<float> wstore, bstore;
  const float* w = param_f32(weight, rw.D, wstore);
  const float* b = param_f32(bias, rw.D, bstore);
  const int64_t D = rw.D;
  for_rows(x, out, rw, [&](const float* xr, float* orow) {
    float mean = static_cast<float>(static_cast<double>(simd::sum_f32(xr, D)) / static_cast<double>(D));
    double var = static_cast<double>(sum_sq(xr, D, mean)) / static_cast<double>(D);
    float inv = static_cast<float>(1.0 / std::sqrt(var + eps));
    scale_row(xr, mean, inv, w, b, orow, D);
  });
}

}  // namespace fast
}  // namespace nx
