// kernels/cpu/simd.h: the small SIMD helpers the CPU kernels share (header-only, namespace nx::simd).
//
// Holds one copy of what elementwise.cpp, reduce.cpp, norm.cpp and attention.cpp used to carry
// privately:
//   tail_mask(n)            AVX-512 lane mask for the first n (< 16; 16 gives 0xffff) lanes.
//   bf16x16_to_f32 / f32_to_bf16x16
//                           16 bf16 <-> 16 f32 (exact widening; narrowing rounds to nearest even with
//                           NaN kept quiet: the same bits as common.h's scalar f32_to_bf16).
//   v_exp(x)                vector e^x, see below.
//   load_row / store_row    a contiguous row of any dtype <-> f32 (bf16/f16 16 lanes at a time, the
//                           tail and integer dtypes through common.h's scalar load_f32 / store_f32).
//   load_block / store_block
//                           the same for m elements of a KView at (offset, stride): contiguous rows go
//                           through load_row / store_row, strided ones element by element.
//   sum_f32(p, n)           f32 sum of a row in 4 x 16 lanes (8 scalar lanes without AVX-512), the
//                           lanes combined pairwise.
// The vector forms exist when the build targets AVX-512 F/BW/VL (NX_SIMD_AVX512: -march=native on
// Zen4 / Sapphire Rapids; every such CPU also has DQ, which elementwise / reduce / norm additionally
// ask for through NX_SIMD_AVX512DQ, as before). Without them load_row / store_row / sum_f32 run plain
// loops and the vector-only helpers do not exist: callers keep their own scalar paths.
//
// v_exp: Cody-Waite reduction x = n ln2 + r with ln2 split in a 16-bit hi part plus a lo part, degree-7
// Taylor polynomial for e^r on |r| <= ln2/2, scaled with vscalefps (gets overflow, underflow and
// subnormals right). Input clamped to [-104, 89] (NaN passes through). Measured over every 3rd f32 in
// [-104, 88.7] against double exp: max 0.94 ulp, 99.5% correctly rounded. (Of the two exps the kernels
// had, this is attention.cpp's polynomial and reduction with elementwise.cpp's clamps; elementwise's
// minimax fit with a 9-bit ln2 split measured max 1.05 ulp, 99.3% correctly rounded.)
#pragma once

#include <cstdint>
#include <cstring>

#include "../common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define NX_SIMD_AVX512 1
#include <immintrin.h>
#else
#define NX_SIMD_AVX512 0
#endif
#if NX_SIMD_AVX512 && defined(__AVX512DQ__)
#define NX_SIMD_AVX512DQ 1
#else
#define NX_SIMD_AVX512DQ 0
#endif

namespace nx {
namespace simd {

#if NX_SIMD_AVX512
inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

inline __m512 bf16x16_to_f32(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m256i f32_to_bf16x16(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

inline __m512 v_exp(__m512 x) {
  // max(lo, x) / min(hi, x) return x when x is NaN (the second operand wins on unordered)
  x = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);        // ln2 hi
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);       // ln2 lo
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#endif  // NX_SIMD_AVX512

// Contiguous row of n elements of any dtype -> f32.
inline void load_row(const void* src, DType t, int64_t n, float* dst) {
  int64_t i = 0;
  const uint16_t* s = static_cast<const uint16_t*>(src);
  switch (t) {
    case DType::F32: std::memcpy(dst, src, static_cast<size_t>(n) * 4); return;
    case DType::BF16:
#if NX_SIMD_AVX512
      for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, bf16x16_to_f32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))));
#endif
      for (; i < n; i++) dst[i] = bf16_to_f32(s[i]);
      return;
    case DType::F16:
#if NX_SIMD_AVX512
      for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))));
#endif
      for (; i < n; i++) dst[i] = f16_to_f32(s[i]);
      return;
    default:
      for (; i < n; i++) dst[i] = load_f32(src, t, i);
  }
}

// f32 -> contiguous row of n elements of any dtype.
inline void store_row(const float* src, int64_t n, void* dst, DType t) {
  int64_t i = 0;
  uint16_t* d = static_cast<uint16_t*>(dst);
  switch (t) {
    case DType::F32: std::memcpy(dst, src, static_cast<size_t>(n) * 4); return;
    case DType::BF16:
#if NX_SIMD_AVX512
      for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), f32_to_bf16x16(_mm512_loadu_ps(src + i)));
#endif
      for (; i < n; i++) d[i] = f32_to_bf16(src[i]);
      return;
    case DType::F16:
#if NX_SIMD_AVX512
      for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
      for (; i < n; i++) d[i] = f32_to_f16(src[i]);
      return;
    default:
      for (; i < n; i++) store_f32(dst, t, i, src[i]);
  }
}

// m elements of v at element offset off with element stride `stride` -> f32 dst.
inline void load_block(const KView& v, int64_t off, int64_t stride, int64_t m, float* dst) {
  if (stride == 1)
    return load_row(static_cast<const unsigned char*>(v.data) + off * static_cast<int64_t>(dtype_size(v.dtype)),
                    v.dtype, m, dst);
  for (int64_t i = 0; i < m; i++) dst[i] = load_f32(v.data, v.dtype, off + i * stride);
}

// f32 src -> m elements of v at element offset off with element stride `stride`.
inline void store_block(const float* src, int64_t m, const KView& v, int64_t off, int64_t stride) {
  if (stride == 1)
    return store_row(src, m, static_cast<unsigned char*>(v.data) + off * static_cast<int64_t>(dtype_size(v.dtype)),
                     v.dtype);
  for (int64_t i = 0; i < m; i++) store_f32(v.data, v.dtype, off + i * stride, src[i]);
}

// Sum of n f32 values: 4 x 16 lanes with AVX-512, else 8 lanes; lanes combined pairwise.
inline float sum_f32(const float* p, int64_t n) {
#if NX_SIMD_AVX512
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    a0 = _mm512_add_ps(a0, _mm512_loadu_ps(p + i));
    a1 = _mm512_add_ps(a1, _mm512_loadu_ps(p + i + 16));
    a2 = _mm512_add_ps(a2, _mm512_loadu_ps(p + i + 32));
    a3 = _mm512_add_ps(a3, _mm512_loadu_ps(p + i + 48));
  }
  for (; i < n; i += 16) a0 = _mm512_add_ps(a0, _mm512_maskz_loadu_ps(tail_mask(n - i < 16 ? n - i : 16), p + i));
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#else
  float a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; j++) a[j] += p[i + j];
  for (; i < n; i++) a[0] += p[i];
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
#endif
}

}  // namespace simd
}  // namespace nx
