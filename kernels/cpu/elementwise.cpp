// elementwise.cpp: binary / unary elementwise math, cast, fill and where (contract in elementwise.h).
//
// Shapes: every view has out's rank and sizes (inputs arrive broadcast, stride 0 on expanded dims).
//
// ref::*  walks out's index space with for_each_index and evaluates float math in DOUBLE, rounding
//         once to out's dtype (via f32, like every path here). It is slow and obviously correct; it is
//         the test oracle and the fallback for every case fast:: does not handle (integer math).
// fast::* coalesces the views' dims (merging dims that are contiguous in every view, dropping size-1
//         dims), so "contiguous", "bias row broadcast [N,D]+[D]", "scalar broadcast" and "per-row
//         scalar [N,D]*[N,1]" all become a loop over rows of an inner dim whose input strides are
//         1 (vector) or 0 (splat). Inner rows run in blocks of kBlock elements: f32 operands with
//         stride 0/1 are used in place, anything else (bf16/f16/int storage, other strides) is
//         converted into an f32 block first, and non-f32 / strided outputs are stored from an f32
//         block. Large tensors split across nx::parallel_for by element ranges (grain kGrainCheap or
//         kGrainHeavy elements per chunk, so small tensors stay on the calling thread).
//         AVX-512 (F/BW/VL/DQ) when compiled for it, plain loops otherwise (any -march builds).
//
// Vector math (AVX-512 only; the scalar build calls std::):
//   exp:     simd::v_exp (simd.h: Cody-Waite reduction x = n ln2 + r, degree-7 polynomial for e^r,
//            scaled with vscalefps; max 0.94 ulp). tanh: (e^2|x| - 1) / (e^2|x| + 1) with an expm1 =
//            2^n (1 + expm1(r)) - 1, expm1(r) from a degree-6 minimax fit (rel. err 1.9e-9) after a
//            9-bit-hi ln2 split (no cancellation near 0). sigmoid/silu: 1 / (1 + e^-x).
//   gelu_tanh ("gelu_new", GPT-2): x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3), which equals
//            0.5 x (1 + tanh u) without its cancellation for negative x.
//   gelu_erf: x * Phi(x); Phi from erf(z) = z P(z^2) (|z| < 0.75, degree-5 fit, 1.4e-9) or
//            erfc(|z|) = e^{-z^2} Q(1 / (1 + |z|/2)) (degree-8 fit of erfcx on [0.75, 10], 1.7e-8),
//            e^{-z^2} evaluated with z^2 = x^2/2 split hi + lo by an FMA.
//   Measured max error against double-precision std:: over the test sweep is printed by
//   test/cpp/elementwise_test.cpp (ew_vector_math_accuracy); see that test for the bounds.
//
// Bench: build/nx_ops_bench (bench/cpp/ops_bench.cpp: add, gelu), or `node bench/kernels.mjs` through the addon.
#include "elementwise.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#define NX_EW_AVX512 NX_SIMD_AVX512DQ  // AVX-512 F/BW/VL/DQ

namespace nx {
namespace {

bool is_cmp(BinaryOp op) { return static_cast<int32_t>(op) >= static_cast<int32_t>(BinaryOp::EQ); }

// Float math when any input is float, or (for non-comparisons) when the output is; int64 otherwise.
bool binary_is_float(BinaryOp op, const KView& a, const KView& b, const KView& out) {
  return dtype_is_float(a.dtype) || dtype_is_float(b.dtype) || (!is_cmp(op) && dtype_is_float(out.dtype));
}
// Integer unary math only for the ops that stay integral, with integer input and output.
bool unary_is_int(UnaryOp op, const KView& x, const KView& out) {
  bool int_op = op == UnaryOp::NEG || op == UnaryOp::ABS || op == UnaryOp::RELU || op == UnaryOp::SQUARE;
  return int_op && !dtype_is_float(x.dtype) && !dtype_is_float(out.dtype);
}

// ---------------------------------------------------------------------------------------------
// Reference scalar math
// ---------------------------------------------------------------------------------------------
constexpr double kSqrt2OverPi = 0.79788456080286535588;  // sqrt(2/pi)
constexpr double kInvSqrt2 = 0.70710678118654752440;

double ref_binary_f(BinaryOp op, double a, double b) {
  switch (op) {
    case BinaryOp::ADD: return a + b;
    case BinaryOp::SUB: return a - b;
    case BinaryOp::MUL: return a * b;
    case BinaryOp::DIV: return a / b;
    case BinaryOp::POW: return std::pow(a, b);
    // NaN propagates (torch.maximum); otherwise a > b ? a : b, so the tie -0/+0 returns b.
    case BinaryOp::MAXIMUM: return (std::isnan(a) || std::isnan(b)) ? NAN : (a > b ? a : b);
    case BinaryOp::MINIMUM: return (std::isnan(a) || std::isnan(b)) ? NAN : (a < b ? a : b);
    case BinaryOp::EQ: return a == b;
    case BinaryOp::NE: return a != b;
    case BinaryOp::LT: return a < b;
    case BinaryOp::LE: return a <= b;
    case BinaryOp::GT: return a > b;
    case BinaryOp::GE: return a >= b;
  }
  return 0;
}

int64_t ref_binary_i(BinaryOp op, int64_t a, int64_t b) {
  using U = uint64_t;  // wrap-around arithmetic without signed-overflow UB
  switch (op) {
    case BinaryOp::ADD: return static_cast<int64_t>(static_cast<U>(a) + static_cast<U>(b));
    case BinaryOp::SUB: return static_cast<int64_t>(static_cast<U>(a) - static_cast<U>(b));
    case BinaryOp::MUL: return static_cast<int64_t>(static_cast<U>(a) * static_cast<U>(b));
    case BinaryOp::DIV:
      if (b == 0) throw Error("BAD_INPUT", "integer division by zero");
      if (b == -1) return static_cast<int64_t>(U{0} - static_cast<U>(a));  // INT64_MIN / -1 wraps
      return a / b;                                                       // truncates toward zero
    case BinaryOp::POW: {
      if (b < 0) throw Error("BAD_INPUT", "integers to negative integer powers are not allowed");
      U r = 1, base = static_cast<U>(a);
      for (int64_t e = b; e > 0; e >>= 1) {
        if (e & 1) r *= base;
        base *= base;
      }
      return static_cast<int64_t>(r);
    }
    case BinaryOp::MAXIMUM: return a > b ? a : b;
    case BinaryOp::MINIMUM: return a < b ? a : b;
    case BinaryOp::EQ: return a == b;
    case BinaryOp::NE: return a != b;
    case BinaryOp::LT: return a < b;
    case BinaryOp::LE: return a <= b;
    case BinaryOp::GT: return a > b;
    case BinaryOp::GE: return a >= b;
  }
  return 0;
}

double ref_unary_f(UnaryOp op, double x) {
  switch (op) {
    case UnaryOp::NEG: return -x;
    case UnaryOp::ABS: return std::fabs(x);
    case UnaryOp::EXP: return std::exp(x);
    case UnaryOp::LOG: return std::log(x);
    case UnaryOp::SQRT: return std::sqrt(x);
    case UnaryOp::RSQRT: return 1.0 / std::sqrt(x);
    case UnaryOp::RELU: return x < 0 ? 0.0 : x;  // NaN stays NaN
    // 0.5 x (1 + tanh u) written as x / (1 + e^{-2u}) (the same function: 0.5 (1 + tanh u) =
    // sigmoid(2u)); the tanh form cancels for negative x (1 + tanh u ~ 1e-10 at x = -6) even in double.
    case UnaryOp::GELU_TANH: return x / (1.0 + std::exp(-2.0 * kSqrt2OverPi * (x + 0.044715 * x * x * x)));
    case UnaryOp::GELU_ERF: return 0.5 * x * std::erfc(-x * kInvSqrt2);  // = 0.5 x (1 + erf(x/sqrt2))
    case UnaryOp::SILU: return x / (1.0 + std::exp(-x));
    case UnaryOp::TANH: return std::tanh(x);
    case UnaryOp::SIGMOID: return 1.0 / (1.0 + std::exp(-x));
    case UnaryOp::SIN: return std::sin(x);
    case UnaryOp::COS: return std::cos(x);
    case UnaryOp::SQUARE: return x * x;
    case UnaryOp::RECIPROCAL: return 1.0 / x;
  }
  return 0;
}

int64_t ref_unary_i(UnaryOp op, int64_t x) {
  using U = uint64_t;
  switch (op) {
    case UnaryOp::NEG: return static_cast<int64_t>(U{0} - static_cast<U>(x));
    case UnaryOp::ABS: return x < 0 ? static_cast<int64_t>(U{0} - static_cast<U>(x)) : x;
    case UnaryOp::RELU: return x < 0 ? 0 : x;
    case UnaryOp::SQUARE: return static_cast<int64_t>(static_cast<U>(x) * static_cast<U>(x));
    default: return 0;  // not reached: unary_is_int filters
  }
}

}  // namespace

namespace ref {

void binary(BinaryOp op, const KView& a, const KView& b, const KView& out) {
  const bool fl = binary_is_float(op, a, b, out);
  for_each_index(out.ndim, out.shape, [&](int64_t, const int64_t* idx) {
    int64_t ia = a.offset_of(idx), ib = b.offset_of(idx), io = out.offset_of(idx);
    if (fl) {
      double r = ref_binary_f(op, load_f32(a.data, a.dtype, ia), load_f32(b.data, b.dtype, ib));
      store_f32(out.data, out.dtype, io, static_cast<float>(r));
    } else {
      store_i64(out.data, out.dtype, io, ref_binary_i(op, load_i64(a.data, a.dtype, ia), load_i64(b.data, b.dtype, ib)));
    }
  });
}

void unary(UnaryOp op, const KView& x, const KView& out) {
  const bool in = unary_is_int(op, x, out);
  for_each_index(out.ndim, out.shape, [&](int64_t, const int64_t* idx) {
    int64_t ix = x.offset_of(idx), io = out.offset_of(idx);
    if (in)
      store_i64(out.data, out.dtype, io, ref_unary_i(op, load_i64(x.data, x.dtype, ix)));
    else
      store_f32(out.data, out.dtype, io, static_cast<float>(ref_unary_f(op, load_f32(x.data, x.dtype, ix))));
  });
}

void cast(const KView& x, const KView& out) {
  const bool from_float = dtype_is_float(x.dtype);
  for_each_index(out.ndim, out.shape, [&](int64_t, const int64_t* idx) {
    int64_t ix = x.offset_of(idx), io = out.offset_of(idx);
    if (from_float)
      store_f32(out.data, out.dtype, io, load_f32(x.data, x.dtype, ix));  // float -> int truncates
    else
      store_i64(out.data, out.dtype, io, load_i64(x.data, x.dtype, ix));  // int64 -> float rounds once
  });
}

void fill(const KView& out, double value) {
  const bool fl = dtype_is_float(out.dtype);
  for_each_index(out.ndim, out.shape, [&](int64_t, const int64_t* idx) {
    int64_t io = out.offset_of(idx);
    if (fl)
      store_f32(out.data, out.dtype, io, static_cast<float>(value));
    else if (out.dtype == DType::BOOL)
      store_i64(out.data, out.dtype, io, value != 0.0 ? 1 : 0);
    else
      store_i64(out.data, out.dtype, io, static_cast<int64_t>(value));
  });
}

void where(const KView& cond, const KView& a, const KView& b, const KView& out) {
  const bool fl = dtype_is_float(out.dtype);
  for_each_index(out.ndim, out.shape, [&](int64_t, const int64_t* idx) {
    bool c = load_i64(cond.data, cond.dtype, cond.offset_of(idx)) != 0;
    const KView& s = c ? a : b;
    int64_t is = s.offset_of(idx), io = out.offset_of(idx);
    if (fl)
      store_f32(out.data, out.dtype, io, load_f32(s.data, s.dtype, is));
    else
      store_i64(out.data, out.dtype, io, load_i64(s.data, s.dtype, is));
  });
}

}  // namespace ref

// =============================================================================================
// fast
// =============================================================================================
namespace {

constexpr int64_t kBlock = 512;          // f32 elements per conversion block (2 KiB, stays in L1)
constexpr int64_t kGrainCheap = 32768;   // elements per thread chunk for memory-bound ops
constexpr int64_t kGrainHeavy = 8192;    // ... for transcendental ops
// Outputs at least this large are written with streaming stores (no read-for-ownership, no cache
// pollution): they cannot stay cached for the next kernel anyway. Measured on the bench machine
// (Zen4, 2 cores): add over 16M f32 goes from ~23 to ~30 GB/s.
constexpr int64_t kStreamBytes = int64_t{32} << 20;

// ---- dims coalescing over up to 4 views sharing out's shape ----
struct Iter {
  int nd = 0;
  int nv = 0;
  int64_t shape[kMaxDims];
  int64_t st[4][kMaxDims];
  int64_t numel = 0;
};

Iter make_iter(const KView* const* views, int nv) {
  const KView& o = *views[0];
  Iter it;
  it.nv = nv;
  it.numel = o.numel();
  // keep non-1 dims, outermost first
  for (int d = 0; d < o.ndim; d++) {
    if (o.shape[d] == 1) continue;
    it.shape[it.nd] = o.shape[d];
    for (int v = 0; v < nv; v++) it.st[v][it.nd] = views[v]->strides[d];
    it.nd++;
  }
  if (it.nd == 0) {
    it.nd = 1;
    it.shape[0] = 1;
    for (int v = 0; v < nv; v++) it.st[v][0] = 0;
    return it;
  }
  // merge dim d into d+1 (inner) when every view walks them as one dim
  int w = it.nd - 1;  // write position, filling from the inner end
  int64_t shp[kMaxDims], str[4][kMaxDims];
  shp[w] = it.shape[it.nd - 1];
  for (int v = 0; v < nv; v++) str[v][w] = it.st[v][it.nd - 1];
  for (int d = it.nd - 2; d >= 0; d--) {
    bool ok = true;
    for (int v = 0; v < nv && ok; v++) ok = it.st[v][d] == str[v][w] * shp[w];
    if (ok) {
      shp[w] *= it.shape[d];
    } else {
      w--;
      shp[w] = it.shape[d];
      for (int v = 0; v < nv; v++) str[v][w] = it.st[v][d];
    }
  }
  int nd = it.nd - w;
  for (int i = 0; i < nd; i++) {
    it.shape[i] = shp[w + i];
    for (int v = 0; v < nv; v++) it.st[v][i] = str[v][w + i];
  }
  it.nd = nd;
  return it;
}

// Calls fn(off[nv], len) for each run of the innermost dim inside linear range [lo, hi).
template <typename Fn>
void for_runs(const Iter& it, int64_t lo, int64_t hi, Fn&& fn) {
  const int64_t L = it.shape[it.nd - 1];
  int64_t p = lo;
  while (p < hi) {
    int64_t row = p / L, col = p % L;
    int64_t len = std::min(L - col, hi - p);
    int64_t off[4] = {0, 0, 0, 0};
    int64_t r = row;
    for (int d = it.nd - 2; d >= 0 && r > 0; d--) {
      int64_t i = r % it.shape[d];
      r /= it.shape[d];
      for (int v = 0; v < it.nv; v++) off[v] += i * it.st[v][d];
    }
    for (int v = 0; v < it.nv; v++) off[v] += col * it.st[v][it.nd - 1];
    fn(off, len);
    p += len;
  }
}

// ---- AVX-512 conversions and math ----
#if NX_EW_AVX512
using simd::tail_mask;
using simd::v_exp;

// tanh(x) = sign(x) * em / (em + 2), em = expm1(2|x|) = 2^n (1 + p) - 1 with p = expm1(r).
inline __m512 v_tanh(__m512 x) {
  const __m512i sign_bit = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), sign_bit);
  __m512 y = _mm512_add_ps(_mm512_abs_ps(x), _mm512_abs_ps(x));
  y = _mm512_min_ps(_mm512_set1_ps(20.0f), y);  // tanh(10) rounds to 1; NaN passes through
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), y);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 q = _mm512_set1_ps(0.0013836425f);
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.0083747253f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.041668228f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.16666421f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.49999992f));
  __m512 p = _mm512_fmadd_ps(_mm512_mul_ps(q, r), r, r);  // expm1(r) = r + r^2 q(r)
  __m512 t = _mm512_scalef_ps(_mm512_set1_ps(1.0f), n);   // 2^n, n >= 0
  __m512 em = _mm512_fmadd_ps(t, p, _mm512_sub_ps(t, _mm512_set1_ps(1.0f)));
  __m512 th = _mm512_div_ps(em, _mm512_add_ps(em, _mm512_set1_ps(2.0f)));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(th), sign));
}

inline __m512 v_sigmoid(__m512 x) {
  __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, v_exp(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

inline __m512 v_gelu_tanh(__m512 x) {
  __m512 x2 = _mm512_mul_ps(x, x);
  __m512 inner = _mm512_fmadd_ps(_mm512_mul_ps(x2, _mm512_set1_ps(0.044715f)), x, x);
  __m512 m2u = _mm512_mul_ps(inner, _mm512_set1_ps(-2.0f * 0.79788456080286535588f));  // -2u
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), v_exp(m2u)));
}

inline __m512 v_gelu_erf(__m512 x) {
  const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
  __m512 az = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(0.70710678118654752f));  // |z|
  // small |z|: Phi = 0.5 (1 + erf(z)), erf(z) = z P(z^2)
  __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
  __m512 z2 = _mm512_mul_ps(z, z);
  __m512 P = _mm512_set1_ps(-0.0006750814128389316f);
  P = _mm512_fmadd_ps(P, z2, _mm512_set1_ps(0.005114522751906052f));
  P = _mm512_fmadd_ps(P, z2, _mm512_set1_ps(-0.026834708588536108f));
  P = _mm512_fmadd_ps(P, z2, _mm512_set1_ps(0.11283378188637556f));
  P = _mm512_fmadd_ps(P, z2, _mm512_set1_ps(-0.37612618864102076f));
  P = _mm512_fmadd_ps(P, z2, _mm512_set1_ps(1.128379165507515f));
  __m512 phi_small = _mm512_fmadd_ps(_mm512_mul_ps(z, P), half, half);
  // large |z|: erfc(|z|) = exp(-z^2) Q(t), t = 1 / (1 + |z|/2)
  __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(az, half, one));
  __m512 Q = _mm512_set1_ps(0.06307495828527326f);
  Q = _mm512_fmadd_ps(Q, t, _mm512_set1_ps(-0.12817990697588946f));
  Q = _mm512_fmadd_ps(Q, t, _mm512_set1_ps(-0.052056808183031954f));
  Q = _mm512_fmadd_ps(Q, t, _mm512_set1_ps(0.16328970053397368f));
  Q = _mm512_fmadd_ps(Q, t, _mm512_set1_ps(0.13169795663884895f));
  Q = _mm512_fmadd_ps(Q, t, _mm512_set1_ps(0.26037722981873224f));
  Q = _mm512_fmadd_ps(Q, t, _mm512_set1_ps(0.27973248742526424f));
  Q = _mm512_fmadd_ps(Q, t, _mm512_set1_ps(0.2823173129498231f));
  Q = _mm512_fmadd_ps(Q, t, _mm512_set1_ps(-8.772575759882776e-06f));
  // |x| clamped to 15 (e^{-112.5} is 0 in f32) so that inf gives a finite lo term below
  __m512 ax = _mm512_min_ps(_mm512_abs_ps(x), _mm512_set1_ps(15.0f));
  __m512 hi = _mm512_mul_ps(_mm512_mul_ps(ax, ax), half);                         // z^2 rounded
  __m512 lo = _mm512_mul_ps(_mm512_fmsub_ps(ax, ax, _mm512_mul_ps(ax, ax)), half);  // its rounding error
  __m512 e = _mm512_mul_ps(v_exp(_mm512_sub_ps(_mm512_setzero_ps(), hi)), _mm512_sub_ps(one, lo));
  __m512 half_erfc = _mm512_mul_ps(_mm512_mul_ps(e, Q), half);  // 0.5 erfc(|z|)
  __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  __m512 phi_large = _mm512_mask_blend_ps(neg, _mm512_sub_ps(one, half_erfc), half_erfc);
  __mmask16 small = _mm512_cmp_ps_mask(az, _mm512_set1_ps(0.75f), _CMP_LT_OQ);
  __m512 phi = _mm512_mask_blend_ps(small, phi_large, phi_small);
  return _mm512_mul_ps(x, phi);
}
#endif  // NX_EW_AVX512

// ---- block load / store between any dtype + stride and an f32 buffer: simd.h ----
using simd::load_block;
using simd::store_block;

// An f32 operand pointer for m elements at (off, stride): in place when f32 with stride 0/1,
// otherwise converted into buf (one element when stride is 0).
const float* operand(const KView& v, int64_t off, int64_t stride, int64_t m, float* buf) {
  if (v.dtype == DType::F32 && (stride == 0 || stride == 1)) return v.ptr<const float>() + off;
  load_block(v, off, stride, stride == 0 ? 1 : m, buf);
  return buf;
}

// ---- op functors: s() scalar, v() vector; kScalarOnly ops run s() per lane ----
#define NX_BIN(NAME, SEXPR, VEXPR)                             \
  struct NAME {                                                \
    static constexpr bool kScalarOnly = false;                 \
    static inline float s(float a, float b) { return SEXPR; } \
    NX_VEC(static inline __m512 v(__m512 a, __m512 b) { return VEXPR; }) \
  };
#if NX_EW_AVX512
#define NX_VEC(...) __VA_ARGS__
#else
#define NX_VEC(...)
#endif

inline float s_max(float a, float b) { return (std::isnan(a) || std::isnan(b)) ? a + b : (a > b ? a : b); }
inline float s_min(float a, float b) { return (std::isnan(a) || std::isnan(b)) ? a + b : (a < b ? a : b); }
#if NX_EW_AVX512
inline __m512 v_cmp01(__mmask16 m) { return _mm512_maskz_mov_ps(m, _mm512_set1_ps(1.0f)); }
inline __m512 v_nanprop(__m512 r, __m512 a, __m512 b) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q), r, _mm512_add_ps(a, b));
}
#endif

NX_BIN(OpAdd, a + b, _mm512_add_ps(a, b))
NX_BIN(OpSub, a - b, _mm512_sub_ps(a, b))
NX_BIN(OpMul, a * b, _mm512_mul_ps(a, b))
NX_BIN(OpDiv, a / b, _mm512_div_ps(a, b))
NX_BIN(OpMax, s_max(a, b), v_nanprop(_mm512_max_ps(a, b), a, b))
NX_BIN(OpMin, s_min(a, b), v_nanprop(_mm512_min_ps(a, b), a, b))
NX_BIN(OpEq, a == b ? 1.0f : 0.0f, v_cmp01(_mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ)))
NX_BIN(OpNe, a != b ? 1.0f : 0.0f, v_cmp01(_mm512_cmp_ps_mask(a, b, _CMP_NEQ_UQ)))
NX_BIN(OpLt, a < b ? 1.0f : 0.0f, v_cmp01(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ)))
NX_BIN(OpLe, a <= b ? 1.0f : 0.0f, v_cmp01(_mm512_cmp_ps_mask(a, b, _CMP_LE_OQ)))
NX_BIN(OpGt, a > b ? 1.0f : 0.0f, v_cmp01(_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ)))
NX_BIN(OpGe, a >= b ? 1.0f : 0.0f, v_cmp01(_mm512_cmp_ps_mask(a, b, _CMP_GE_OQ)))
struct OpPow {
  static constexpr bool kScalarOnly = true;
  static inline float s(float a, float b) { return b == 2.0f ? a * a : std::pow(a, b); }  // pow(a,2) == a*a exactly
  NX_VEC(static inline __m512 v(__m512 a, __m512) { return a; })
};

// NT: non-temporal (streaming) stores, for outputs far larger than the caches (see kStreamBytes).
template <class Op, bool ABC, bool BBC, bool NT>
void bin_loop(const float* a, const float* b, float* o, int64_t n) {
#if NX_EW_AVX512
  if constexpr (!Op::kScalarOnly) {
    const __m512 ca = ABC ? _mm512_set1_ps(a[0]) : _mm512_setzero_ps();
    const __m512 cb = BBC ? _mm512_set1_ps(b[0]) : _mm512_setzero_ps();
    auto masked = [&](int64_t i, int64_t k) {
      __mmask16 m = tail_mask(k);
      __m512 va = ABC ? ca : _mm512_maskz_loadu_ps(m, a + i);
      __m512 vb = BBC ? cb : _mm512_maskz_loadu_ps(m, b + i);
      _mm512_mask_storeu_ps(o + i, m, Op::v(va, vb));
    };
    int64_t i = 0;
    if (NT) {  // peel to a 64-byte aligned output
      i = std::min<int64_t>(n, static_cast<int64_t>((64 - (reinterpret_cast<uintptr_t>(o) & 63)) & 63) / 4);
      if (i) masked(0, i);
    }
    for (; i + 16 <= n; i += 16) {
      __m512 va = ABC ? ca : _mm512_loadu_ps(a + i);
      __m512 vb = BBC ? cb : _mm512_loadu_ps(b + i);
      if (NT)
        _mm512_stream_ps(o + i, Op::v(va, vb));
      else
        _mm512_storeu_ps(o + i, Op::v(va, vb));
    }
    if (i < n) masked(i, n - i);
    if (NT) _mm_sfence();
    return;
  }
#endif
  for (int64_t i = 0; i < n; i++) o[i] = Op::s(ABC ? a[0] : a[i], BBC ? b[0] : b[i]);
}

template <class Op>
void bin_dispatch_modes(const float* a, bool abc, const float* b, bool bbc, float* o, int64_t n, bool nt) {
  if (abc && bbc) {
    float r = Op::s(a[0], b[0]);
    for (int64_t i = 0; i < n; i++) o[i] = r;
  } else if (abc) {
    nt ? bin_loop<Op, true, false, true>(a, b, o, n) : bin_loop<Op, true, false, false>(a, b, o, n);
  } else if (bbc) {
    nt ? bin_loop<Op, false, true, true>(a, b, o, n) : bin_loop<Op, false, true, false>(a, b, o, n);
  } else {
    nt ? bin_loop<Op, false, false, true>(a, b, o, n) : bin_loop<Op, false, false, false>(a, b, o, n);
  }
}

void bin_block(BinaryOp op, const float* a, bool abc, const float* b, bool bbc, float* o, int64_t n, bool nt) {
  switch (op) {
    case BinaryOp::ADD: return bin_dispatch_modes<OpAdd>(a, abc, b, bbc, o, n, nt);
    case BinaryOp::SUB: return bin_dispatch_modes<OpSub>(a, abc, b, bbc, o, n, nt);
    case BinaryOp::MUL: return bin_dispatch_modes<OpMul>(a, abc, b, bbc, o, n, nt);
    case BinaryOp::DIV: return bin_dispatch_modes<OpDiv>(a, abc, b, bbc, o, n, nt);
    case BinaryOp::POW: return bin_dispatch_modes<OpPow>(a, abc, b, bbc, o, n, nt);
    case BinaryOp::MAXIMUM: return bin_dispatch_modes<OpMax>(a, abc, b, bbc, o, n, nt);
    case BinaryOp::MINIMUM: return bin_dispatch_modes<OpMin>(a, abc, b, bbc, o, n, nt);
    case BinaryOp::EQ: return bin_dispatch_modes<OpEq>(a, abc, b, bbc, o, n, nt);
    case BinaryOp::NE: return bin_dispatch_modes<OpNe>(a, abc, b, bbc, o, n, nt);
    case BinaryOp::LT: return bin_dispatch_modes<OpLt>(a, abc, b, bbc, o, n, nt);
    case BinaryOp::LE: return bin_dispatch_modes<OpLe>(a, abc, b, bbc, o, n, nt);
    case BinaryOp::GT: return bin_dispatch_modes<OpGt>(a, abc, b, bbc, o, n, nt);
    case BinaryOp::GE: return bin_dispatch_modes<OpGe>(a, abc, b, bbc, o, n, nt);
  }
}

// ---- unary functors ----
#define NX_UN(NAME, SCALAR_ONLY, SEXPR, VEXPR)              \
  struct NAME {                                             \
    static constexpr bool kScalarOnly = SCALAR_ONLY;        \
    static inline float s(float x) { return SEXPR; }        \
    NX_VEC(static inline __m512 v(__m512 x) { return VEXPR; }) \
  };
NX_UN(UNeg, false, -x, _mm512_sub_ps(_mm512_setzero_ps(), x))
NX_UN(UAbs, false, std::fabs(x), _mm512_abs_ps(x))
NX_UN(UExp, false, std::exp(x), v_exp(x))
NX_UN(ULog, true, std::log(x), x)
NX_UN(USqrt, false, std::sqrt(x), _mm512_sqrt_ps(x))
NX_UN(URsqrt, false, 1.0f / std::sqrt(x), _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_sqrt_ps(x)))
NX_UN(URelu, false, x < 0.0f ? 0.0f : x,
      _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_NLT_UQ), x))
// scalar gelus evaluate their argument in double: in f32 its rounding error is amplified ~|2u| (~z^2)
NX_UN(UGeluTanh, false, static_cast<float>(ref_unary_f(UnaryOp::GELU_TANH, x)), v_gelu_tanh(x))
NX_UN(UGeluErf, false, static_cast<float>(ref_unary_f(UnaryOp::GELU_ERF, x)), v_gelu_erf(x))
NX_UN(USilu, false, x / (1.0f + std::exp(-x)), _mm512_mul_ps(x, v_sigmoid(x)))
NX_UN(UTanh, false, std::tanh(x), v_tanh(x))
NX_UN(USigmoid, false, 1.0f / (1.0f + std::exp(-x)), v_sigmoid(x))
NX_UN(USin, true, std::sin(x), x)
NX_UN(UCos, true, std::cos(x), x)
NX_UN(USquare, false, x * x, _mm512_mul_ps(x, x))
NX_UN(URecip, false, 1.0f / x, _mm512_div_ps(_mm512_set1_ps(1.0f), x))

template <class Op, bool NT>
void un_loop(const float* x, float* o, int64_t n) {
#if NX_EW_AVX512
  if constexpr (!Op::kScalarOnly) {
    auto masked = [&](int64_t i, int64_t k) {
      __mmask16 m = tail_mask(k);
      _mm512_mask_storeu_ps(o + i, m, Op::v(_mm512_maskz_loadu_ps(m, x + i)));
    };
    int64_t i = 0;
    if (NT) {
      i = std::min<int64_t>(n, static_cast<int64_t>((64 - (reinterpret_cast<uintptr_t>(o) & 63)) & 63) / 4);
      if (i) masked(0, i);
    }
    for (; i + 16 <= n; i += 16) {
      if (NT)
        _mm512_stream_ps(o + i, Op::v(_mm512_loadu_ps(x + i)));
      else
        _mm512_storeu_ps(o + i, Op::v(_mm512_loadu_ps(x + i)));
    }
    if (i < n) masked(i, n - i);
    if (NT) _mm_sfence();
    return;
  }
#endif
  for (int64_t i = 0; i < n; i++) o[i] = Op::s(x[i]);
}

void un_block(UnaryOp op, const float* x, float* o, int64_t n, bool nt) {
  switch (op) {
    case UnaryOp::NEG: return nt ? un_loop<UNeg, true>(x, o, n) : un_loop<UNeg, false>(x, o, n);
    case UnaryOp::ABS: return nt ? un_loop<UAbs, true>(x, o, n) : un_loop<UAbs, false>(x, o, n);
    case UnaryOp::EXP: return nt ? un_loop<UExp, true>(x, o, n) : un_loop<UExp, false>(x, o, n);
    case UnaryOp::LOG: return nt ? un_loop<ULog, true>(x, o, n) : un_loop<ULog, false>(x, o, n);
    case UnaryOp::SQRT: return nt ? un_loop<USqrt, true>(x, o, n) : un_loop<USqrt, false>(x, o, n);
    case UnaryOp::RSQRT: return nt ? un_loop<URsqrt, true>(x, o, n) : un_loop<URsqrt, false>(x, o, n);
    case UnaryOp::RELU: return nt ? un_loop<URelu, true>(x, o, n) : un_loop<URelu, false>(x, o, n);
    case UnaryOp::GELU_TANH: return nt ? un_loop<UGeluTanh, true>(x, o, n) : un_loop<UGeluTanh, false>(x, o, n);
    case UnaryOp::GELU_ERF: return nt ? un_loop<UGeluErf, true>(x, o, n) : un_loop<UGeluErf, false>(x, o, n);
    case UnaryOp::SILU: return nt ? un_loop<USilu, true>(x, o, n) : un_loop<USilu, false>(x, o, n);
    case UnaryOp::TANH: return nt ? un_loop<UTanh, true>(x, o, n) : un_loop<UTanh, false>(x, o, n);
    case UnaryOp::SIGMOID: return nt ? un_loop<USigmoid, true>(x, o, n) : un_loop<USigmoid, false>(x, o, n);
    case UnaryOp::SIN: return nt ? un_loop<USin, true>(x, o, n) : un_loop<USin, false>(x, o, n);
    case UnaryOp::COS: return nt ? un_loop<UCos, true>(x, o, n) : un_loop<UCos, false>(x, o, n);
    case UnaryOp::SQUARE: return nt ? un_loop<USquare, true>(x, o, n) : un_loop<USquare, false>(x, o, n);
    case UnaryOp::RECIPROCAL: return nt ? un_loop<URecip, true>(x, o, n) : un_loop<URecip, false>(x, o, n);
  }
}

bool unary_is_heavy(UnaryOp op) {
  switch (op) {
    case UnaryOp::EXP: case UnaryOp::LOG: case UnaryOp::GELU_TANH: case UnaryOp::GELU_ERF:
    case UnaryOp::SILU: case UnaryOp::TANH: case UnaryOp::SIGMOID: case UnaryOp::SIN: case UnaryOp::COS:
      return true;
    default: return false;
  }
}

// Strided copy between views of the same element size (no conversion).
template <typename T>
void copy_run(const T* s, int64_t ss, T* d, int64_t ds, int64_t n) {
  if (ss == 1 && ds == 1) {
    std::memcpy(d, s, static_cast<size_t>(n) * sizeof(T));
  } else if (ss == 0) {
    T v = s[0];
    for (int64_t i = 0; i < n; i++) d[i * ds] = v;
  } else {
    for (int64_t i = 0; i < n; i++) d[i * ds] = s[i * ss];
  }
}
void copy_run_bytes(size_t esz, const void* s, int64_t ss, void* d, int64_t ds, int64_t n) {
  switch (esz) {
    case 1: return copy_run(static_cast<const uint8_t*>(s), ss, static_cast<uint8_t*>(d), ds, n);
    case 2: return copy_run(static_cast<const uint16_t*>(s), ss, static_cast<uint16_t*>(d), ds, n);
    case 4: return copy_run(static_cast<const uint32_t*>(s), ss, static_cast<uint32_t*>(d), ds, n);
    default: return copy_run(static_cast<const uint64_t*>(s), ss, static_cast<uint64_t*>(d), ds, n);
  }
}
// Tiled copy of a batch of R x C planes where out is contiguous along C and x along R (the
// ".transpose(..).contiguous()" case): 32 x 32 tiles keep both sides' cache lines and pages hot;
// an element-by-element walk would touch a new page per element for large strides.
template <typename T>
void transpose_tiles(const Iter& it, const T* x, T* o) {
  const int nd = it.nd;
  const int64_t R = it.shape[nd - 2], C = it.shape[nd - 1];
  const int64_t o_r = it.st[0][nd - 2], x_c = it.st[1][nd - 1];  // out row stride, x column stride
  constexpr int64_t kT = 32;
  const int64_t rt = (R + kT - 1) / kT;
  const int64_t batch = it.numel / (R * C);
  parallel_for(0, batch * rt, std::max<int64_t>(1, 32768 / (kT * C)), [&](int64_t lo, int64_t hi) {
    for (int64_t g = lo; g < hi; g++) {
      int64_t b = g / rt, r0 = (g % rt) * kT, r1 = std::min(R, r0 + kT);
      int64_t ob = 0, xb = 0;
      for (int d = nd - 3; d >= 0; d--) {
        int64_t i = b % it.shape[d];
        b /= it.shape[d];
        ob += i * it.st[0][d];
        xb += i * it.st[1][d];
      }
      for (int64_t c0 = 0; c0 < C; c0 += kT) {
        int64_t c1 = std::min(C, c0 + kT);
        for (int64_t r = r0; r < r1; r++)
          for (int64_t c = c0; c < c1; c++) o[ob + r * o_r + c] = x[xb + r + c * x_c];
      }
    }
  });
}

const void* elem_ptr(const KView& v, int64_t off) {
  return static_cast<const unsigned char*>(v.data) + off * static_cast<int64_t>(dtype_size(v.dtype));
}
void* elem_ptr_mut(const KView& v, int64_t off) {
  return static_cast<unsigned char*>(v.data) + off * static_cast<int64_t>(dtype_size(v.dtype));
}

}  // namespace

namespace fast {

void binary(BinaryOp op, const KView& a, const KView& b, const KView& out) {
  if (!binary_is_float(op, a, b, out)) return ref::binary(op, a, b, out);  // integer math: reference
  const KView* vs[3] = {&out, &a, &b};
  const Iter it = make_iter(vs, 3);
  if (it.numel == 0) return;
  const int64_t so = it.st[0][it.nd - 1], sa = it.st[1][it.nd - 1], sb = it.st[2][it.nd - 1];
  const int64_t grain = op == BinaryOp::POW ? kGrainHeavy : kGrainCheap;
  // all-f32 unit/zero-stride rows need no conversion blocks: whole runs go to the vector loop
  const bool direct_all = a.dtype == DType::F32 && b.dtype == DType::F32 && out.dtype == DType::F32 &&
                          (sa == 0 || sa == 1) && (sb == 0 || sb == 1) && so == 1;
  const bool nt = direct_all && it.numel * 4 >= kStreamBytes;
  parallel_for(0, it.numel, grain, [&](int64_t lo, int64_t hi) {
    alignas(64) float ba[kBlock], bb[kBlock], bo[kBlock];
    for_runs(it, lo, hi, [&](const int64_t* off, int64_t len) {
      const int64_t step = direct_all ? len : kBlock;
      for (int64_t j = 0; j < len; j += step) {
        int64_t m = std::min(step, len - j);
        const float* pa = operand(a, off[1] + j * sa, sa, m, ba);
        const float* pb = operand(b, off[2] + j * sb, sb, m, bb);
        const bool direct = out.dtype == DType::F32 && so == 1;
        float* po = direct ? out.ptr<float>() + off[0] + j * so : bo;
        bin_block(op, pa, sa == 0, pb, sb == 0, po, m, nt);
        if (!direct) store_block(bo, m, out, off[0] + j * so, so);
      }
    });
  });
}

void unary(UnaryOp op, const KView& x, const KView& out) {
  if (unary_is_int(op, x, out)) return ref::unary(op, x, out);
  const KView* vs[2] = {&out, &x};
  const Iter it = make_iter(vs, 2);
  if (it.numel == 0) return;
  const int64_t so = it.st[0][it.nd - 1], sx = it.st[1][it.nd - 1];
  const bool direct_all = x.dtype == DType::F32 && out.dtype == DType::F32 && sx == 1 && so == 1;
  const bool nt = direct_all && it.numel * 4 >= kStreamBytes;
  parallel_for(0, it.numel, unary_is_heavy(op) ? kGrainHeavy : kGrainCheap, [&](int64_t lo, int64_t hi) {
    alignas(64) float bx[kBlock], bo[kBlock];
    for_runs(it, lo, hi, [&](const int64_t* off, int64_t len) {
      const int64_t step = direct_all ? len : kBlock;
      for (int64_t j = 0; j < len; j += step) {
        int64_t m = std::min(step, len - j);
        const float* px;
        if (sx == 0) {  // a broadcast input: one value, computed once
          load_block(x, off[1], 0, 1, bx);
          for (int64_t i = 1; i < m; i++) bx[i] = bx[0];
          px = bx;
        } else {
          px = operand(x, off[1] + j * sx, sx, m, bx);
        }
        const bool direct = out.dtype == DType::F32 && so == 1;
        float* po = direct ? out.ptr<float>() + off[0] + j * so : bo;
        un_block(op, px, po, m, nt);
        if (!direct) store_block(bo, m, out, off[0] + j * so, so);
      }
    });
  });
}

void unary_f32(UnaryOp op, const float* x, float* o, int64_t n) { un_block(op, x, o, n, false); }

void cast(const KView& x, const KView& out) {
  const bool same = x.dtype == out.dtype;
  const bool floats = dtype_is_float(x.dtype) && dtype_is_float(out.dtype);
  if (!same && !floats) return ref::cast(x, out);  // int <-> float / int <-> int conversions
  const KView* vs[2] = {&out, &x};
  const Iter it = make_iter(vs, 2);
  if (it.numel == 0) return;
  const int64_t so = it.st[0][it.nd - 1], sx = it.st[1][it.nd - 1];
  const size_t esz = dtype_size(out.dtype);
  if (same && it.nd >= 2 && so == 1 && it.st[1][it.nd - 2] == 1 && sx > 1 && it.shape[it.nd - 1] >= 8) {
    switch (esz) {
      case 1: return transpose_tiles(it, x.ptr<const uint8_t>(), out.ptr<uint8_t>());
      case 2: return transpose_tiles(it, x.ptr<const uint16_t>(), out.ptr<uint16_t>());
      case 4: return transpose_tiles(it, x.ptr<const uint32_t>(), out.ptr<uint32_t>());
      default: return transpose_tiles(it, x.ptr<const uint64_t>(), out.ptr<uint64_t>());
    }
  }
  parallel_for(0, it.numel, kGrainCheap, [&](int64_t lo, int64_t hi) {
    alignas(64) float buf[kBlock];
    for_runs(it, lo, hi, [&](const int64_t* off, int64_t len) {
      if (same) return copy_run_bytes(esz, elem_ptr(x, off[1]), sx, elem_ptr_mut(out, off[0]), so, len);
      for (int64_t j = 0; j < len; j += kBlock) {
        int64_t m = std::min(kBlock, len - j);
        if (sx == 0) {
          load_block(x, off[1], 0, 1, buf);
          for (int64_t i = 1; i < m; i++) buf[i] = buf[0];
        } else {
          load_block(x, off[1] + j * sx, sx, m, buf);
        }
        store_block(buf, m, out, off[0] + j * so, so);
      }
    });
  });
}

void fill(const KView& out, double value) {
  // one element converted by the reference, then replicated as raw bytes
  unsigned char elem[8] = {0};
  KView one;
  one.data = elem;
  one.dtype = out.dtype;
  one.ndim = 0;
  ref::fill(one, value);
  KView src = out;
  src.data = elem;
  for (int d = 0; d < src.ndim; d++) src.strides[d] = 0;
  const KView* vs[2] = {&out, &src};
  const Iter it = make_iter(vs, 2);
  if (it.numel == 0) return;
  const int64_t so = it.st[0][it.nd - 1];
  const size_t esz = dtype_size(out.dtype);
  parallel_for(0, it.numel, kGrainCheap * 2, [&](int64_t lo, int64_t hi) {
    for_runs(it, lo, hi, [&](const int64_t* off, int64_t len) {
      copy_run_bytes(esz, elem, 0, elem_ptr_mut(out, off[0]), so, len);
    });
  });
}

void where(const KView& cond, const KView& a, const KView& b, const KView& out) {
  if (cond.dtype != DType::BOOL || a.dtype != out.dtype || b.dtype != out.dtype) return ref::where(cond, a, b, out);
  const KView* vs[4] = {&out, &cond, &a, &b};
  const Iter it = make_iter(vs, 4);
  if (it.numel == 0) return;
  const int64_t so = it.st[0][it.nd - 1], sc = it.st[1][it.nd - 1], sa = it.st[2][it.nd - 1],
                sb = it.st[3][it.nd - 1];
  const size_t esz = dtype_size(out.dtype);
  parallel_for(0, it.numel, kGrainCheap, [&](int64_t lo, int64_t hi) {
    for_runs(it, lo, hi, [&](const int64_t* off, int64_t len) {
      const uint8_t* c = cond.ptr<const uint8_t>() + off[1];
      const unsigned char* pa = static_cast<const unsigned char*>(elem_ptr(a, off[2]));
      const unsigned char* pb = static_cast<const unsigned char*>(elem_ptr(b, off[3]));
      unsigned char* po = static_cast<unsigned char*>(elem_ptr_mut(out, off[0]));
      for (int64_t i = 0; i < len; i++) {
        const unsigned char* s = c[i * sc] ? pa + i * sa * static_cast<int64_t>(esz) : pb + i * sb * static_cast<int64_t>(esz);
        std::memcpy(po + i * so * static_cast<int64_t>(esz), s, esz);
      }
    });
  });
}

}  // namespace fast
}  // namespace nx
