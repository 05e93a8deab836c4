// kernels/common.h: the few types every kernel shares.
//
// Kernels see tensors as `KView`s: a data pointer (already advanced by the view's offset), a dtype,
// a shape and strides. Strides are counted in ELEMENTS, not bytes (as in PyTorch and candle), and may
// be 0 (broadcast) or arbitrary (transposed / sliced views). Kernels never allocate tensors and never
// validate shapes: `native/src/core` checks every argument before a kernel runs, so a kernel may assume
// that shapes agree. The only errors a kernel raises are data-dependent ones (an index out of range),
// as `nx::Error` with a stable code.
//
// Usage:
//   nx::KView x = ...;                        // built by core from a Tensor
//   nx::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) { ... });
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>

// NX_HD: functions below that the CUDA kernels (kernels/cuda) call on the device too, so a cast on the GPU
// rounds with the very same bit operations as on the CPU (memcpy is allowed in device code).
#if defined(__CUDACC__)
#define NX_HD __host__ __device__
#else
#define NX_HD
#endif

namespace nx {

// The numeric values are part of the addon ABI (exported to TS as `dtypes`).
enum class DType : int32_t { F32 = 0, F16 = 1, BF16 = 2, I32 = 3, I64 = 4, BOOL = 5 };
constexpr int kNumDTypes = 6;

NX_HD inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::F16: return 2;
    case DType::BF16: return 2;
    case DType::I32: return 4;
    case DType::I64: return 8;
    case DType::BOOL: return 1;
  }
  return 0;
}
NX_HD inline bool dtype_is_float(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16; }
inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    case DType::I32: return "int32";
    case DType::I64: return "int64";
    case DType::BOOL: return "bool";
  }
  return "?";
}

// ---- scalar conversions (round-to-nearest-even, NaN kept quiet) ----
NX_HD inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
NX_HD inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
NX_HD inline float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { e++; man <<= 1; } while ((man & 0x400u) == 0);
      u = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
NX_HD inline uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf (>= 65520)
  if (a < 0x38800000u) {  // subnormal or zero in f16: round via float addition trick
    float af;
    std::memcpy(&af, &a, 4);
    af += 0.5f;  // 0.5 = 2^-1 shifts the f16 subnormal bits into the low mantissa, rounding to nearest even
    uint32_t r;
    std::memcpy(&r, &af, 4);
    return static_cast<uint16_t>(sign | (r - 0x3f000000u));
  }
  uint32_t mant_odd = (a >> 13) & 1u;
  a += 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round to nearest even
  return static_cast<uint16_t>(sign | (a >> 13));
}

// Load element i (already an element offset from data) of any dtype as float / double / int64.
NX_HD inline float load_f32(const void* data, DType t, int64_t i) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(data)[i];
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(data)[i]);
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(data)[i]);
    case DType::I32: return static_cast<float>(static_cast<const int32_t*>(data)[i]);
    case DType::I64: return static_cast<float>(static_cast<const int64_t*>(data)[i]);
    case DType::BOOL: return static_cast<const uint8_t*>(data)[i] ? 1.0f : 0.0f;
  }
  return 0.0f;
}
NX_HD inline int64_t load_i64(const void* data, DType t, int64_t i) {
  switch (t) {
    case DType::F32: return static_cast<int64_t>(static_cast<const float*>(data)[i]);
    case DType::F16: return static_cast<int64_t>(f16_to_f32(static_cast<const uint16_t*>(data)[i]));
    case DType::BF16: return static_cast<int64_t>(bf16_to_f32(static_cast<const uint16_t*>(data)[i]));
    case DType::I32: return static_cast<const int32_t*>(data)[i];
    case DType::I64: return static_cast<const int64_t*>(data)[i];
    case DType::BOOL: return static_cast<const uint8_t*>(data)[i] ? 1 : 0;
  }
  return 0;
}
NX_HD inline void store_f32(void* data, DType t, int64_t i, float v) {
  switch (t) {
    case DType::F32: static_cast<float*>(data)[i] = v; break;
    case DType::F16: static_cast<uint16_t*>(data)[i] = f32_to_f16(v); break;
    case DType::BF16: static_cast<uint16_t*>(data)[i] = f32_to_bf16(v); break;
    case DType::I32: static_cast<int32_t*>(data)[i] = static_cast<int32_t>(v); break;
    case DType::I64: static_cast<int64_t*>(data)[i] = static_cast<int64_t>(v); break;
    case DType::BOOL: static_cast<uint8_t*>(data)[i] = v != 0.0f ? 1 : 0; break;
  }
}
NX_HD inline void store_i64(void* data, DType t, int64_t i, int64_t v) {
  switch (t) {
    case DType::F32: static_cast<float*>(data)[i] = static_cast<float>(v); break;
    case DType::F16: static_cast<uint16_t*>(data)[i] = f32_to_f16(static_cast<float>(v)); break;
    case DType::BF16: static_cast<uint16_t*>(data)[i] = f32_to_bf16(static_cast<float>(v)); break;
    case DType::I32: static_cast<int32_t*>(data)[i] = static_cast<int32_t>(v); break;
    case DType::I64: static_cast<int64_t*>(data)[i] = v; break;
    case DType::BOOL: static_cast<uint8_t*>(data)[i] = v != 0 ? 1 : 0; break;
  }
}

// ---- errors ----
// Stable codes shared with TS (`NNsightError.code`): BAD_INPUT, SHAPE, DTYPE, INDEX, DISPOSED, IO,
// UNSUPPORTED, DEVICE (no usable CUDA / tensors on different devices / a failed CUDA call), OOM, INTERNAL.
struct Error : std::runtime_error {
  std::string code;
  Error(std::string c, const std::string& msg) : std::runtime_error(msg), code(std::move(c)) {}
};

// ---- strided views ----
constexpr int kMaxDims = 8;

struct KView {
  void* data = nullptr;  // points at the view's first element (offset already applied)
  DType dtype = DType::F32;
  int ndim = 0;
  int64_t shape[kMaxDims] = {0};
  int64_t strides[kMaxDims] = {0};  // in elements

  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) n *= shape[i];
    return n;
  }
  int64_t size(int d) const { return shape[d < 0 ? d + ndim : d]; }
  int64_t stride(int d) const { return strides[d < 0 ? d + ndim : d]; }
  // True when elements are laid out densely in row-major order (size-1 dims may have any stride).
  bool contiguous() const {
    int64_t expect = 1;
    for (int i = ndim - 1; i >= 0; i--) {
      if (shape[i] != 1 && strides[i] != expect) return false;
      expect *= shape[i];
    }
    return true;
  }
  template <typename T>
  T* ptr() const { return static_cast<T*>(data); }
  // Element offset (in elements) of a multi-index.
  int64_t offset_of(const int64_t* idx) const {
    int64_t o = 0;
    for (int i = 0; i < ndim; i++) o += idx[i] * strides[i];
    return o;
  }
};

// Visit every element of `shape` (rank ndim) in row-major order, calling fn(linear_index, idx[]).
// A plain helper for reference kernels; fast kernels should not use it in inner loops.
template <typename Fn>
inline void for_each_index(int ndim, const int64_t* shape, Fn&& fn) {
  int64_t n = 1;
  for (int i = 0; i < ndim; i++) n *= shape[i];
  if (n == 0) return;
  int64_t idx[kMaxDims] = {0};
  for (int64_t lin = 0; lin < n; lin++) {
    fn(lin, static_cast<const int64_t*>(idx));
    for (int d = ndim - 1; d >= 0; d--) {
      if (++idx[d] < shape[d]) break;
      idx[d] = 0;
    }
  }
}

// ---- threads (implemented in native/src/core/threadpool.cpp) ----
// Runs fn(lo, hi) over [begin, end) split into chunks of at least `grain` items on the shared pool.
// The calling thread takes part. Calls from inside a pool task run serially (no nested parallelism).
void parallel_for(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);
// Number of threads the pool uses (1 = serial).
int num_threads();
void set_num_threads(int n);

}  // namespace nx
