// elementwise.cu: binary / unary math, cast (the strided copy), fill and where on the GPU.
// Contract: kernels/cpu/elementwise.h; reference: nx::ref in kernels/cpu/elementwise.cpp.
//
// One thread per output element in a grid-stride loop; views of any strides (a row-major linear index
// is unravelled over out's shape, or used as is when every view is contiguous). dtypes are switched
// per element (the switch is uniform across a warp).
// Float math is f32 (CUDA's libdevice functions, IEEE add/sub/mul/div/sqrt, no fast-math) where the
// reference evaluates in double and rounds once: + - * / and sqrt / reciprocal are bit-identical to the
// reference; POW and RSQRT are computed in double (as the reference); the transcendental functions are
// within a few f32 ulp (tolerances in test/cuda/elementwise_test.cpp). Integer math is int64 with
// wrap-around as the reference; integer division by zero and negative integer powers are flagged on
// the device and raise BAD_INPUT (the output is then poisoned, as on the CPU).
#include <cmath>

#include "common.cuh"

namespace nx {
namespace cuda {

namespace {

constexpr float kSqrt2OverPiF = 0.79788456080286535588f;
constexpr float kInvSqrt2F = 0.70710678118654752440f;

bool is_cmp(BinaryOp op) { return static_cast<int32_t>(op) >= static_cast<int32_t>(BinaryOp::EQ); }
bool binary_is_float(BinaryOp op, const KView& a, const KView& b, const KView& out) {
  return dtype_is_float(a.dtype) || dtype_is_float(b.dtype) || (!is_cmp(op) && dtype_is_float(out.dtype));
}
bool unary_is_int(UnaryOp op, const KView& x, const KView& out) {
  bool int_op = op == UnaryOp::NEG || op == UnaryOp::ABS || op == UnaryOp::RELU || op == UnaryOp::SQUARE;
  return int_op && !dtype_is_float(x.dtype) && !dtype_is_float(out.dtype);
}
bool all_contiguous(const KView& a, const KView* b = nullptr, const KView* c = nullptr, const KView* d = nullptr) {
  return a.contiguous() && (!b || b->contiguous()) && (!c || c->contiguous()) && (!d || d->contiguous());
}

__device__ inline float bin_f(BinaryOp op, float a, float b) {
  switch (op) {
    case BinaryOp::ADD: return __fadd_rn(a, b);
    case BinaryOp::SUB: return __fsub_rn(a, b);
    case BinaryOp::MUL: return __fmul_rn(a, b);
    case BinaryOp::DIV: return __fdiv_rn(a, b);
    case BinaryOp::POW: return static_cast<float>(pow(static_cast<double>(a), static_cast<double>(b)));
    case BinaryOp::MAXIMUM: return (isnan(a) || isnan(b)) ? NAN : (a > b ? a : b);
    case BinaryOp::MINIMUM: return (isnan(a) || isnan(b)) ? NAN : (a < b ? a : b);
    case BinaryOp::EQ: return a == b ? 1.0f : 0.0f;
    case BinaryOp::NE: return a != b ? 1.0f : 0.0f;
    case BinaryOp::LT: return a < b ? 1.0f : 0.0f;
    case BinaryOp::LE: return a <= b ? 1.0f : 0.0f;
    case BinaryOp::GT: return a > b ? 1.0f : 0.0f;
    case BinaryOp::GE: return a >= b ? 1.0f : 0.0f;
  }
  return 0.0f;
}

// *ok = false for the integer errors (division by zero, negative power); the result is then 0.
__device__ inline int64_t bin_i(BinaryOp op, int64_t a, int64_t b, bool* ok) {
  using U = unsigned long long;
  switch (op) {
    case BinaryOp::ADD: return static_cast<int64_t>(static_cast<U>(a) + static_cast<U>(b));
    case BinaryOp::SUB: return static_cast<int64_t>(static_cast<U>(a) - static_cast<U>(b));
    case BinaryOp::MUL: return static_cast<int64_t>(static_cast<U>(a) * static_cast<U>(b));
    case BinaryOp::DIV:
      if (b == 0) {
        *ok = false;
        return 0;
      }
      if (b == -1) return static_cast<int64_t>(U{0} - static_cast<U>(a));
      return a / b;
    case BinaryOp::POW: {
      if (b < 0) {
        *ok = false;
        return 0;
      }
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

__device__ inline float un_f(UnaryOp op, float x) {
  switch (op) {
    case UnaryOp::NEG: return -x;
    case UnaryOp::ABS: return fabsf(x);
    case UnaryOp::EXP: return expf(x);
    case UnaryOp::LOG: return logf(x);
    case UnaryOp::SQRT: return sqrtf(x);
    case UnaryOp::RSQRT: return static_cast<float>(1.0 / sqrt(static_cast<double>(x)));
    case UnaryOp::RELU: return x < 0.0f ? 0.0f : x;
    // x * sigmoid(2u): the form without cancellation for negative x (see the CPU reference)
    case UnaryOp::GELU_TANH: {
      const float u = kSqrt2OverPiF * (x + 0.044715f * x * x * x);
      return x / (1.0f + expf(-2.0f * u));
    }
    case UnaryOp::GELU_ERF: return 0.5f * x * erfcf(-x * kInvSqrt2F);
    case UnaryOp::SILU: return x / (1.0f + expf(-x));
    case UnaryOp::TANH: return tanhf(x);
    case UnaryOp::SIGMOID: return 1.0f / (1.0f + expf(-x));
    case UnaryOp::SIN: return sinf(x);
    case UnaryOp::COS: return cosf(x);
    case UnaryOp::SQUARE: return __fmul_rn(x, x);
    case UnaryOp::RECIPROCAL: return __fdiv_rn(1.0f, x);
  }
  return 0.0f;
}

__device__ inline int64_t un_i(UnaryOp op, int64_t x) {
  using U = unsigned long long;
  switch (op) {
    case UnaryOp::NEG: return static_cast<int64_t>(U{0} - static_cast<U>(x));
    case UnaryOp::ABS: return x < 0 ? static_cast<int64_t>(U{0} - static_cast<U>(x)) : x;
    case UnaryOp::RELU: return x < 0 ? 0 : x;
    case UnaryOp::SQUARE: return static_cast<int64_t>(static_cast<U>(x) * static_cast<U>(x));
    default: return 0;
  }
}

__global__ void binary_kernel(BinaryOp op, bool fl, KView a, KView b, KView o, int64_t n, bool contig, long long* bad) {
  NX_CUDA_LOOP(i, n) {
    int64_t io = i, ia = i, ib = i;
    if (!contig) offsets_of(i, o.ndim, o.shape, o.strides, &io, a.strides, &ia, b.strides, &ib);
    if (fl) {
      store_f32(o.data, o.dtype, io, bin_f(op, load_f32(a.data, a.dtype, ia), load_f32(b.data, b.dtype, ib)));
    } else {
      bool ok = true;
      const int64_t r = bin_i(op, load_i64(a.data, a.dtype, ia), load_i64(b.data, b.dtype, ib), &ok);
      if (!ok) report_bad(bad, i);
      store_i64(o.data, o.dtype, io, r);
    }
  }
}

__global__ void unary_kernel(UnaryOp op, bool in, KView x, KView o, int64_t n, bool contig) {
  NX_CUDA_LOOP(i, n) {
    int64_t io = i, ix = i;
    if (!contig) offsets_of(i, o.ndim, o.shape, o.strides, &io, x.strides, &ix);
    if (in)
      store_i64(o.data, o.dtype, io, un_i(op, load_i64(x.data, x.dtype, ix)));
    else
      store_f32(o.data, o.dtype, io, un_f(op, load_f32(x.data, x.dtype, ix)));
  }
}

__global__ void cast_kernel(KView x, KView o, int64_t n, bool contig) {
  NX_CUDA_LOOP(i, n) {
    int64_t io = i, ix = i;
    if (!contig) offsets_of(i, o.ndim, o.shape, o.strides, &io, x.strides, &ix);
    copy_elem(x.data, x.dtype, ix, o.data, o.dtype, io);
  }
}

__global__ void fill_kernel(KView o, unsigned long long bits, int64_t n, bool contig) {
  NX_CUDA_LOOP(i, n) {
    int64_t io = i;
    if (!contig) offsets_of(i, o.ndim, o.shape, o.strides, &io);
    switch (dtype_size(o.dtype)) {
      case 1: static_cast<uint8_t*>(o.data)[io] = static_cast<uint8_t>(bits); break;
      case 2: static_cast<uint16_t*>(o.data)[io] = static_cast<uint16_t>(bits); break;
      case 4: static_cast<uint32_t*>(o.data)[io] = static_cast<uint32_t>(bits); break;
      default: static_cast<unsigned long long*>(o.data)[io] = bits; break;
    }
  }
}

__global__ void where_kernel(KView c, KView a, KView b, KView o, int64_t n, bool contig) {
  NX_CUDA_LOOP(i, n) {
    int64_t io = i, ic = i, ia = i, ib = i;
    if (!contig) offsets_of(i, o.ndim, o.shape, o.strides, &io, c.strides, &ic, a.strides, &ia, b.strides, &ib);
    const bool pick_a = load_i64(c.data, c.dtype, ic) != 0;
    const void* sp = pick_a ? a.data : b.data;
    const DType st = pick_a ? a.dtype : b.dtype;
    const int64_t so = pick_a ? ia : ib;
    if (dtype_is_float(o.dtype))
      store_f32(o.data, o.dtype, io, load_f32(sp, st, so));
    else
      store_i64(o.data, o.dtype, io, load_i64(sp, st, so));
  }
}

}  // namespace

void binary(BinaryOp op, const KView& a, const KView& b, const KView& out) {
  const int64_t n = out.numel();
  if (n == 0) return;
  const bool fl = binary_is_float(op, a, b, out);
  const bool checked = !fl && (op == BinaryOp::DIV || op == BinaryOp::POW);
  if (checked) bad_reset();
  binary_kernel<<<grid_for(n), kBlock, 0, stream()>>>(op, fl, a, b, out, n, all_contiguous(out, &a, &b), bad_slot());
  check_launch("binary");
  if (checked && bad_first() != kNoBad)
    throw Error("BAD_INPUT", op == BinaryOp::DIV ? "integer division by zero"
                                                 : "integers to negative integer powers are not allowed");
}

void unary(UnaryOp op, const KView& x, const KView& out) {
  const int64_t n = out.numel();
  if (n == 0) return;
  unary_kernel<<<grid_for(n), kBlock, 0, stream()>>>(op, unary_is_int(op, x, out), x, out, n, all_contiguous(out, &x));
  check_launch("unary");
}

void cast(const KView& x, const KView& out) {
  const int64_t n = out.numel();
  if (n == 0) return;
  if (x.dtype == out.dtype && x.contiguous() && out.contiguous()) {
    copy_d2d(out.data, x.data, static_cast<size_t>(n) * dtype_size(out.dtype));
    return;
  }
  cast_kernel<<<grid_for(n), kBlock, 0, stream()>>>(x, out, n, all_contiguous(out, &x));
  check_launch("cast");
}

void fill(const KView& out, double value) {
  const int64_t n = out.numel();
  if (n == 0) return;
  // The element's bytes, made on the host exactly as ref::fill makes them.
  unsigned char buf[8] = {0};
  if (dtype_is_float(out.dtype))
    store_f32(buf, out.dtype, 0, static_cast<float>(value));
  else if (out.dtype == DType::BOOL)
    store_i64(buf, out.dtype, 0, value != 0.0 ? 1 : 0);
  else
    store_i64(buf, out.dtype, 0, static_cast<int64_t>(value));
  unsigned long long bits = 0;
  std::memcpy(&bits, buf, 8);
  fill_kernel<<<grid_for(n), kBlock, 0, stream()>>>(out, bits, n, out.contiguous());
  check_launch("fill");
}

void where(const KView& cond, const KView& a, const KView& b, const KView& out) {
  const int64_t n = out.numel();
  if (n == 0) return;
  where_kernel<<<grid_for(n), kBlock, 0, stream()>>>(cond, a, b, out, n, all_contiguous(out, &cond, &a, &b));
  check_launch("where");
}

}  // namespace cuda
}  // namespace nx
