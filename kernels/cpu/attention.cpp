// attention.cpp: rotary position embeddings (rope) and causal grouped-query attention over a KV cache.
//
// rope:      x [B, T, H, D], pos [B, T] (I32/I64), inv_freq [R/2] f32 -> out [B, T, H, D].
//            angle = float(pos) * inv_freq[i], computed in f32 exactly as HF does, so both kernels rotate
//            by the same angle; the reference then takes cos/sin in double, the fast kernel in float.
//            interleaved: pairs (2i, 2i+1); rotate_half: pairs (i, i + R/2); dims R..D pass through.
// attention: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] (views into a [B, Hkv, maxT, D] cache are fine),
//            mask [B, Tk] or none -> out [B, Hq, Tq, D] f32. Query i sits at key position Tk - Tq + i.
//
// ref::  plain loops over any dtype and strides, dot products and softmax in double: the test oracle.
// fast:: rope: f32 with a contiguous last dim; cos/sin computed once per (b, t) row, AVX-512 rotation.
//        attention: one task = (b, kv head, block of query positions, key split). A task holds every
//        query head of its group (GQA), so each K/V block is read from memory once and reused from L1
//        by all G heads. Keys go in blocks of KB (64 for D = 64): scores of the block, then one online-
//        softmax update (flash-attention style running max/sum, the accumulators rescaled once per
//        block), then P.V with a tile's accumulators held in registers (each V row loaded once per tile
//        of 4 rows). The scores come from one of two kernels, by the task's row count R = query
//        positions x G:
//        - R < 8 (decode with G < 8): tiles of 4 (or 2, 1) rows; 16 dot products at a time (4 rows x 4
//          keys, each K chunk loaded once for the 4 rows) and one transpose-reduce for the 16 sums.
//        - R >= 8 (GQA decode with G >= 8, prefill): the lane path. 8 rows sit in the 8 lanes of a
//          vector (q transposed once per task, qT[d][row]); for a group of 8 keys, s[key][row] is one
//          FMA per (key, d) with k[key][d] broadcast, so there is no horizontal reduction at all, and
//          the block's max, exp, sum and rescale factor are computed for 8 rows at once. P.V reads p
//          at key stride 8. Rows past R (R not a multiple of 8) are padded lanes, never written out.
//        K/V may be f32, bf16 or f16 (widened while loading; the lane path widens a bf16/f16 K block
//        into scratch first); q and out may have any strides. When there are too few tasks for the
//        threads (decode with few kv heads), the keys are split across tasks and the partial
//        (max, sum, acc) triples merged by whichever task finishes a group's last split. Tasks are
//        claimed from per-thread ranges of consecutive tasks (own range first, then the others'), so a
//        worker that wakes late or is descheduled does not hold the call up. When K + V exceed the last-
//        level cache, the 4-row tile path prefetches the next key block into L2 (DRAM-bound decode);
//        K/V that may be cache-resident are left to the hardware prefetcher. A row that sees no key
//        writes zeros. Masked keys inside a visible span enter P.V with weight exactly 0, so their V
//        rows must be finite (a NaN/inf left in a padded cache slot would leak; ref skips them).
//        Without AVX-512 (a plain `g++ -O3` build) the same tiling runs with scalar loops.
//
// Bench: build/nx_attention_bench (bench/cpp/attention_bench.cpp), or by hand:
//          g++ -O3 -std=c++17 -march=native -I. bench/cpp/attention_bench.cpp kernels/cpu/attention.cpp
//          native/src/core/threadpool.cpp -lpthread -o /tmp/attn_bench && /tmp/attn_bench
//        `node bench/kernels.mjs --filter rope` / `--filter attention` run them through the addon.
#include "attention.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "simd.h"

// AVX-512 paths need F (512-bit math) plus BW/VL (16-bit masked loads); Zen4 and Sapphire Rapids have all.
#if NX_SIMD_AVX512
#define NX_ATTN_AVX512 1
// GCC 12's AVX-512 headers trip -W(maybe-)uninitialized on their own _mm*_undefined_*() helpers
// (GCC bug 105593, fixed in GCC 13); the warnings point into the system headers, not at this file.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#endif

#if defined(__GNUC__)
#define NX_NOINLINE __attribute__((noinline))
#define NX_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define NX_NOINLINE
#define NX_ALWAYS_INLINE inline
#endif

namespace nx {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t pos_at(const KView& pos, int64_t b, int64_t t) {
  return load_i64(pos.data, pos.dtype, b * pos.strides[0] + t * pos.strides[1]);
}

}  // namespace

// =====================================================================================================
// Reference kernels
// =====================================================================================================
namespace ref {

void rope(const KView& x, const KView& pos, const KView& inv_freq, bool interleaved, const KView& out) {
  const int64_t B = x.shape[0], T = x.shape[1], H = x.shape[2], D = x.shape[3];
  const int64_t half = inv_freq.shape[0], R = 2 * half;
  for (int64_t b = 0; b < B; b++)
    for (int64_t t = 0; t < T; t++) {
      const float p = static_cast<float>(pos_at(pos, b, t));
      for (int64_t h = 0; h < H; h++) {
        const int64_t xo = b * x.strides[0] + t * x.strides[1] + h * x.strides[2];
        const int64_t oo = b * out.strides[0] + t * out.strides[1] + h * out.strides[2];
        for (int64_t i = 0; i < half; i++) {
          const int64_t ia = interleaved ? 2 * i : i;
          const int64_t ib = interleaved ? 2 * i + 1 : i + half;
          const float ang = p * load_f32(inv_freq.data, inv_freq.dtype, i * inv_freq.strides[0]);
          const double c = std::cos(static_cast<double>(ang)), s = std::sin(static_cast<double>(ang));
          const double a = load_f32(x.data, x.dtype, xo + ia * x.strides[3]);
          const double bb = load_f32(x.data, x.dtype, xo + ib * x.strides[3]);
          // both read before either is written, so out may alias x
          store_f32(out.data, out.dtype, oo + ia * out.strides[3], static_cast<float>(a * c - bb * s));
          store_f32(out.data, out.dtype, oo + ib * out.strides[3], static_cast<float>(a * s + bb * c));
        }
        for (int64_t d = R; d < D; d++)
          store_f32(out.data, out.dtype, oo + d * out.strides[3], load_f32(x.data, x.dtype, xo + d * x.strides[3]));
      }
    }
}

void attention(const KView& q, const KView& k, const KView& v, const KView* mask, float scale, const KView& out) {
  const int64_t B = q.shape[0], Hq = q.shape[1], Tq = q.shape[2], D = q.shape[3];
  const int64_t Hkv = k.shape[1], Tk = k.shape[2];
  const int64_t G = Hkv > 0 ? Hq / Hkv : 1;
  std::vector<double> s(static_cast<size_t>(Tk));
  std::vector<double> acc(static_cast<size_t>(D));
  for (int64_t b = 0; b < B; b++)
    for (int64_t h = 0; h < Hq; h++) {
      const int64_t kh = h / G;
      for (int64_t i = 0; i < Tq; i++) {
        const int64_t qpos = Tk - Tq + i;
        const int64_t qo = b * q.strides[0] + h * q.strides[1] + i * q.strides[2];
        double mx = -std::numeric_limits<double>::infinity();
        bool any = false;
        for (int64_t j = 0; j < Tk; j++) {
          s[j] = -std::numeric_limits<double>::infinity();
          if (j > qpos) continue;
          if (mask && load_f32(mask->data, mask->dtype, b * mask->strides[0] + j * mask->strides[1]) == 0.0f) continue;
          const int64_t ko = b * k.strides[0] + kh * k.strides[1] + j * k.strides[2];
          double dot = 0;
          for (int64_t d = 0; d < D; d++)
            dot += static_cast<double>(load_f32(q.data, q.dtype, qo + d * q.strides[3])) *
                   load_f32(k.data, k.dtype, ko + d * k.strides[3]);
          s[j] = dot * scale;
          mx = std::max(mx, s[j]);
          any = true;
        }
        const int64_t oo = b * out.strides[0] + h * out.strides[1] + i * out.strides[2];
        std::fill(acc.begin(), acc.end(), 0.0);
        double sum = 0;
        if (any) {
          for (int64_t j = 0; j < Tk; j++) {
            if (s[j] == -std::numeric_limits<double>::infinity()) continue;
            const double w = std::exp(s[j] - mx);
            sum += w;
            const int64_t vo = b * v.strides[0] + kh * v.strides[1] + j * v.strides[2];
            for (int64_t d = 0; d < D; d++) acc[d] += w * load_f32(v.data, v.dtype, vo + d * v.strides[3]);
          }
        }
        for (int64_t d = 0; d < D; d++)
          store_f32(out.data, out.dtype, oo + d * out.strides[3], any ? static_cast<float>(acc[d] / sum) : 0.0f);
      }
    }
}

}  // namespace ref

// =====================================================================================================
// Fast kernels
// =====================================================================================================
namespace fast {

namespace {

// ---- rope row rotation: out[j] = x[j] * C[j] + partner(x)[j] * S[j] ----
// interleaved: C/S hold R entries (C[2i] = C[2i+1] = cos_i, S[2i] = -sin_i, S[2i+1] = sin_i), partner
// swaps each pair. rotate_half: C/S hold R/2 entries (cos_i, sin_i) and both halves are done together.
void rope_row_interleaved(const float* x, float* o, const float* C, const float* S, int64_t R) {
  int64_t j = 0;
#if defined(NX_ATTN_AVX512)
  for (; j + 16 <= R; j += 16) {
    __m512 xv = _mm512_loadu_ps(x + j);
    __m512 sw = _mm512_shuffle_ps(xv, xv, 0xB1);  // [x1, x0, x3, x2, ...]
    _mm512_storeu_ps(o + j, _mm512_fmadd_ps(xv, _mm512_loadu_ps(C + j), _mm512_mul_ps(sw, _mm512_loadu_ps(S + j))));
  }
  if (j < R) {
    const __mmask16 m = simd::tail_mask(R - j);
    __m512 xv = _mm512_maskz_loadu_ps(m, x + j);
    __m512 sw = _mm512_shuffle_ps(xv, xv, 0xB1);
    __m512 r = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(m, C + j), _mm512_mul_ps(sw, _mm512_maskz_loadu_ps(m, S + j)));
    _mm512_mask_storeu_ps(o + j, m, r);
  }
#else
  for (; j < R; j += 2) {
    const float a = x[j], b = x[j + 1];
    o[j] = a * C[j] + b * S[j];
    o[j + 1] = b * C[j + 1] + a * S[j + 1];
  }
#endif
}

void rope_row_half(const float* x, float* o, const float* C, const float* S, int64_t half) {
  int64_t j = 0;
#if defined(NX_ATTN_AVX512)
  for (; j + 16 <= half; j += 16) {
    __m512 a = _mm512_loadu_ps(x + j), b = _mm512_loadu_ps(x + half + j);
    __m512 c = _mm512_loadu_ps(C + j), s = _mm512_loadu_ps(S + j);
    _mm512_storeu_ps(o + j, _mm512_fmsub_ps(a, c, _mm512_mul_ps(b, s)));
    _mm512_storeu_ps(o + half + j, _mm512_fmadd_ps(b, c, _mm512_mul_ps(a, s)));
  }
  if (j < half) {
    const __mmask16 m = simd::tail_mask(half - j);
    __m512 a = _mm512_maskz_loadu_ps(m, x + j), b = _mm512_maskz_loadu_ps(m, x + half + j);
    __m512 c = _mm512_maskz_loadu_ps(m, C + j), s = _mm512_maskz_loadu_ps(m, S + j);
    _mm512_mask_storeu_ps(o + j, m, _mm512_fmsub_ps(a, c, _mm512_mul_ps(b, s)));
    _mm512_mask_storeu_ps(o + half + j, m, _mm512_fmadd_ps(b, c, _mm512_mul_ps(a, s)));
  }
#else
  for (; j < half; j++) {
    const float a = x[j], b = x[half + j];
    o[j] = a * C[j] - b * S[j];
    o[half + j] = b * C[j] + a * S[j];
  }
#endif
}

}  // namespace

void rope(const KView& x, const KView& pos, const KView& inv_freq, bool interleaved, const KView& out) {
  if (x.dtype != DType::F32 || out.dtype != DType::F32 || x.strides[3] != 1 || out.strides[3] != 1) {
    ref::rope(x, pos, inv_freq, interleaved, out);
    return;
  }
  const int64_t B = x.shape[0], T = x.shape[1], H = x.shape[2], D = x.shape[3];
  const int64_t half = inv_freq.shape[0], R = 2 * half;
  if (B * T * H * D == 0) return;
  std::vector<float> invf(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; i++) invf[i] = load_f32(inv_freq.data, inv_freq.dtype, i * inv_freq.strides[0]);
  const float* xp = x.ptr<float>();
  float* op = out.ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H * D));  // >= ~64 KiB per chunk
  parallel_for(0, B * T, grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> C(static_cast<size_t>(R) + 16), S(static_cast<size_t>(R) + 16);
    for (int64_t row = lo; row < hi; row++) {
      const int64_t b = row / T, t = row % T;
      const float p = static_cast<float>(pos_at(pos, b, t));
      // cos/sin once per (b, t): shared by all H heads of the row
      for (int64_t i = 0; i < half; i++) {
        const float ang = p * invf[i];
        const float c = std::cos(ang), s = std::sin(ang);
        if (interleaved) {
          C[2 * i] = C[2 * i + 1] = c;
          S[2 * i] = -s;
          S[2 * i + 1] = s;
        } else {
          C[i] = c;
          S[i] = s;
        }
      }
      for (int64_t h = 0; h < H; h++) {
        const float* xr = xp + b * x.strides[0] + t * x.strides[1] + h * x.strides[2];
        float* orow = op + b * out.strides[0] + t * out.strides[1] + h * out.strides[2];
        if (interleaved)
          rope_row_interleaved(xr, orow, C.data(), S.data(), R);
        else
          rope_row_half(xr, orow, C.data(), S.data(), half);
        if (orow != xr && D > R) std::memmove(orow + R, xr + R, static_cast<size_t>(D - R) * sizeof(float));
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// attention
// ---------------------------------------------------------------------------------------------------
namespace {

// Element loads for K/V storage types (f32, bf16 and f16 held as uint16_t with a tag type).
struct Bf16 { uint16_t bits; };
struct F16 { uint16_t bits; };
inline float to_f(float x) { return x; }
inline float to_f(Bf16 x) { return bf16_to_f32(x.bits); }
inline float to_f(F16 x) { return f16_to_f32(x.bits); }

#if defined(NX_ATTN_AVX512)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const Bf16* p) { return simd::bf16x16_to_f32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m512 load16(const F16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const Bf16* p, __mmask16 m) { return simd::bf16x16_to_f32(_mm256_maskz_loadu_epi16(m, p)); }
inline __m512 load16(const F16* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }

// An empty asm that claims to modify v: the compiler must hold v in a register from here on. Without
// it GCC folds a V chunk's load into each of the NR FMAs that use it (NR loads instead of one), and
// with 512-bit loads at one per cycle on Zen 4 the P.V tile became load-bound (measured 0.72 -> 0.58 us
// per 8 rows x 64 keys x D = 64 with the value kept in a register).
inline void keep_in_register(__m512& v) {
#if defined(__GNUC__)
  __asm__("" : "+v"(v));
#else
  (void)v;
#endif
}

// Sum each of 16 vectors horizontally; lane t of the result is sum(v[t]). 30 shuffles + 15 adds instead
// of 16 separate reductions.
inline __m512 transpose_reduce16(const __m512* v) {
  __m512 w[8];
  for (int p = 0; p < 8; p++)  // per 128-bit lane: [a_even, b_even, a_odd, b_odd] partials
    w[p] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * p], v[2 * p + 1]), _mm512_unpackhi_ps(v[2 * p], v[2 * p + 1]));
  __m512 u[4];
  for (int p = 0; p < 4; p++) {  // per lane: partial sums of keys 4p..4p+3
    __m512d a = _mm512_castps_pd(w[2 * p]), b = _mm512_castps_pd(w[2 * p + 1]);
    u[p] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  __m512 y01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  __m512 y23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y01, y23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(y01, y23, _MM_SHUFFLE(3, 1, 3, 1)));
}
#endif

// Scores of NR query rows (q: row stride Dp floats, already scaled, zero-padded) against NK = 16 / NR
// keys whose rows start at kp[0..NK): s[r * sst + kk] = q_r . k_kk. Each K chunk is loaded once and
// used by all NR rows; the 16 partial-sum vectors are reduced together in one transpose-reduce.
template <int NR, typename KT>
inline void score_tile(const float* q, int64_t Dp, const KT* const* kp, int64_t D, float* s, int64_t sst) {
  constexpr int NK = 16 / NR;
#if defined(NX_ATTN_AVX512)
  __m512 acc[16];
#pragma GCC unroll 16
  for (int t = 0; t < 16; t++) acc[t] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= D; c += 16) {
    __m512 qv[NR];
#pragma GCC unroll 4
    for (int r = 0; r < NR; r++) qv[r] = _mm512_loadu_ps(q + r * Dp + c);
#pragma GCC unroll 16
    for (int kk = 0; kk < NK; kk++) {
      const __m512 kv = load16(kp[kk] + c);
#pragma GCC unroll 4
      for (int r = 0; r < NR; r++) acc[r * NK + kk] = _mm512_fmadd_ps(qv[r], kv, acc[r * NK + kk]);
    }
  }
  if (c < D) {  // masked tail: never reads past a key row
    const __mmask16 m = simd::tail_mask(D - c);
    __m512 qv[NR];
#pragma GCC unroll 4
    for (int r = 0; r < NR; r++) qv[r] = _mm512_loadu_ps(q + r * Dp + c);
#pragma GCC unroll 16
    for (int kk = 0; kk < NK; kk++) {
      const __m512 kv = load16(kp[kk] + c, m);
#pragma GCC unroll 4
      for (int r = 0; r < NR; r++) acc[r * NK + kk] = _mm512_fmadd_ps(qv[r], kv, acc[r * NK + kk]);
    }
  }
  const __m512 res = transpose_reduce16(acc);  // lane r * NK + kk
  if (NR == 1) {
    _mm512_storeu_ps(s, res);
  } else if (NR == 2) {
    _mm256_storeu_ps(s, _mm512_castps512_ps256(res));
    _mm256_storeu_ps(s + sst, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(res), 1)));
  } else {
    _mm_storeu_ps(s, _mm512_castps512_ps128(res));
    _mm_storeu_ps(s + sst, _mm512_extractf32x4_ps(res, 1));
    _mm_storeu_ps(s + 2 * sst, _mm512_extractf32x4_ps(res, 2));
    _mm_storeu_ps(s + 3 * sst, _mm512_extractf32x4_ps(res, 3));
  }
#else
  for (int r = 0; r < NR; r++)
    for (int kk = 0; kk < NK; kk++) {
      float acc = 0;
      for (int64_t d = 0; d < D; d++) acc += q[r * Dp + d] * to_f(kp[kk][d]);
      s[r * sst + kk] = acc;
    }
#endif
}

// In place over s[0, n) (n a multiple of 16): s = exp(s - m) (0 where s = -inf); returns the sum.
inline float exp_sub_sum(float* s, int64_t n, float m) {
#if defined(NX_ATTN_AVX512)
  __m512 sum = _mm512_setzero_ps();
  const __m512 mv = _mm512_set1_ps(m), ninf = _mm512_set1_ps(kNegInf);
  for (int64_t j = 0; j < n; j += 16) {
    const __m512 x = _mm512_loadu_ps(s + j);
    const __mmask16 valid = _mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ);
    const __m512 p = _mm512_maskz_mov_ps(valid, simd::v_exp(_mm512_sub_ps(x, mv)));
    _mm512_storeu_ps(s + j, p);
    sum = _mm512_add_ps(sum, p);
  }
  return _mm512_reduce_add_ps(sum);
#else
  float sum = 0;
  for (int64_t j = 0; j < n; j++) {
    s[j] = s[j] == kNegInf ? 0.0f : std::exp(s[j] - m);
    sum += s[j];
  }
  return sum;
#endif
}

inline float max_of(const float* s, int64_t n) {  // n a multiple of 16
#if defined(NX_ATTN_AVX512)
  __m512 m = _mm512_set1_ps(kNegInf);
  for (int64_t j = 0; j < n; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + j));
  return _mm512_reduce_max_ps(m);
#else
  float m = kNegInf;
  for (int64_t j = 0; j < n; j++) m = std::max(m, s[j]);
  return m;
#endif
}

// acc[0, D) = acc * alpha + sum_{j < n} p[j * pjs] * v[j * vs + (0, D)]. acc is padded to a multiple of 16.
template <typename VT>
inline void pv_row(float* acc, float alpha, const float* p, int64_t pjs, int64_t n, const VT* v, int64_t vs,
                   int64_t D) {
#if defined(NX_ATTN_AVX512)
  for (int64_t c = 0; c < D; c += 16) {
    const bool tail = c + 16 > D;
    const __mmask16 m = tail ? simd::tail_mask(D - c) : static_cast<__mmask16>(0xFFFF);
    __m512 a0 = _mm512_mul_ps(_mm512_loadu_ps(acc + c), _mm512_set1_ps(alpha));
    __m512 a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    const VT* vc = v + c;
    int64_t j = 0;
    if (!tail) {  // four independent FMA chains hide the FMA latency
      for (; j + 4 <= n; j += 4) {
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(p[j * pjs]), load16(vc + j * vs), a0);
        a1 = _mm512_fmadd_ps(_mm512_set1_ps(p[(j + 1) * pjs]), load16(vc + (j + 1) * vs), a1);
        a2 = _mm512_fmadd_ps(_mm512_set1_ps(p[(j + 2) * pjs]), load16(vc + (j + 2) * vs), a2);
        a3 = _mm512_fmadd_ps(_mm512_set1_ps(p[(j + 3) * pjs]), load16(vc + (j + 3) * vs), a3);
      }
      for (; j < n; j++) a0 = _mm512_fmadd_ps(_mm512_set1_ps(p[j * pjs]), load16(vc + j * vs), a0);
    } else {
      for (; j + 4 <= n; j += 4) {
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(p[j * pjs]), load16(vc + j * vs, m), a0);
        a1 = _mm512_fmadd_ps(_mm512_set1_ps(p[(j + 1) * pjs]), load16(vc + (j + 1) * vs, m), a1);
        a2 = _mm512_fmadd_ps(_mm512_set1_ps(p[(j + 2) * pjs]), load16(vc + (j + 2) * vs, m), a2);
        a3 = _mm512_fmadd_ps(_mm512_set1_ps(p[(j + 3) * pjs]), load16(vc + (j + 3) * vs, m), a3);
      }
      for (; j < n; j++) a0 = _mm512_fmadd_ps(_mm512_set1_ps(p[j * pjs]), load16(vc + j * vs, m), a0);
    }
    _mm512_storeu_ps(acc + c, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }
#else
  for (int64_t d = 0; d < D; d++) acc[d] *= alpha;
  for (int64_t j = 0; j < n; j++) {
    const float pj = p[j * pjs];
    if (pj == 0.0f) continue;
    const VT* vr = v + j * vs;
    for (int64_t d = 0; d < D; d++) acc[d] += pj * to_f(vr[d]);
  }
#endif
}

#if defined(NX_ATTN_AVX512)
// NR rows at once with the whole acc (NC chunks of 16) in registers: each V row is loaded once for all
// NR rows. acc[r * Dp + (0, D)] = acc * alpha[r] + sum_{j < n} p[r * pst + j * pjs] * v[j * vs + (0, D)].
template <int NC, int NR, typename VT>
NX_NOINLINE void pv_tile(float* acc, int64_t Dp, const float* alpha, const float* p, int64_t pst, int64_t pjs,
                         int64_t n, const VT* v, int64_t vs, int64_t D) {
  const __mmask16 tm = (D % 16) ? simd::tail_mask(D % 16) : static_cast<__mmask16>(0xFFFF);
  __m512 a[NR][NC];
#pragma GCC unroll 4
  for (int r = 0; r < NR; r++) {
    const __m512 al = _mm512_set1_ps(alpha[r]);
#pragma GCC unroll 8
    for (int c = 0; c < NC; c++) a[r][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * Dp + c * 16), al);
  }
  for (int64_t j = 0; j < n; j++) {
    const VT* vr = v + j * vs;
    __m512 vv[NC];
#pragma GCC unroll 8
    for (int c = 0; c < NC - 1; c++) vv[c] = load16(vr + c * 16);
    vv[NC - 1] = load16(vr + (NC - 1) * 16, tm);
#pragma GCC unroll 8
    for (int c = 0; c < NC; c++) keep_in_register(vv[c]);
#pragma GCC unroll 4
    for (int r = 0; r < NR; r++) {
      const __m512 pr = _mm512_set1_ps(p[r * pst + j * pjs]);
#pragma GCC unroll 8
      for (int c = 0; c < NC; c++) a[r][c] = _mm512_fmadd_ps(pr, vv[c], a[r][c]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < NR; r++)
#pragma GCC unroll 8
    for (int c = 0; c < NC; c++) _mm512_storeu_ps(acc + r * Dp + c * 16, a[r][c]);
}

template <int NR, typename VT>
inline bool pv_tile_dispatch(float* acc, int64_t Dp, const float* alpha, const float* p, int64_t pst, int64_t pjs,
                             int64_t n, const VT* v, int64_t vs, int64_t D) {
  switch (Dp / 16) {
    case 1: pv_tile<1, NR>(acc, Dp, alpha, p, pst, pjs, n, v, vs, D); return true;
    case 2: pv_tile<2, NR>(acc, Dp, alpha, p, pst, pjs, n, v, vs, D); return true;
    case 3: pv_tile<3, NR>(acc, Dp, alpha, p, pst, pjs, n, v, vs, D); return true;
    case 4: pv_tile<4, NR>(acc, Dp, alpha, p, pst, pjs, n, v, vs, D); return true;
    default: break;
  }
  if (NR > 2) return false;  // keep NR * NC <= 16 accumulators in registers
  switch (Dp / 16) {
    case 5: pv_tile<5, NR>(acc, Dp, alpha, p, pst, pjs, n, v, vs, D); return true;
    case 6: pv_tile<6, NR>(acc, Dp, alpha, p, pst, pjs, n, v, vs, D); return true;
    case 7: pv_tile<7, NR>(acc, Dp, alpha, p, pst, pjs, n, v, vs, D); return true;
    case 8: pv_tile<8, NR>(acc, Dp, alpha, p, pst, pjs, n, v, vs, D); return true;
    default: return false;
  }
}
#endif

// P.V for NR rows: the register tile when D <= 128 (D <= 64 for 4 rows at once), else row by row.
template <int NR, typename VT>
inline void pv_rows(float* acc, int64_t Dp, const float* alpha, const float* p, int64_t pst, int64_t pjs, int64_t n,
                    const VT* v, int64_t vs, int64_t D) {
#if defined(NX_ATTN_AVX512)
  if (pv_tile_dispatch<NR>(acc, Dp, alpha, p, pst, pjs, n, v, vs, D)) return;
  if (NR == 4 && Dp <= 128) {
    pv_tile_dispatch<2>(acc, Dp, alpha, p, pst, pjs, n, v, vs, D);
    pv_tile_dispatch<2>(acc + 2 * Dp, Dp, alpha + 2, p + 2 * pst, pst, pjs, n, v, vs, D);
    return;
  }
#endif
  for (int r = 0; r < NR; r++) pv_row(acc + r * Dp, alpha[r], p + r * pst, pjs, n, v, vs, D);
}

// Tasks with at least this many rows take the lane path (attn_task_lanes); fewer rows would leave lanes
// empty (4 rows in 8 lanes measured slower than the 4-row tiles).
constexpr int64_t kLaneRows = 8;

inline uint32_t low_bits(int64_t n) {  // n clamped to [0, 16]
  return n <= 0 ? 0u : n >= 16 ? 0xFFFFu : ((1u << n) - 1u);
}

// Last-level cache size in bytes: Linux's sysfs entry for the L3 of cpu0 (as bench/kernels.mjs reads it;
// glibc's sysconf(_SC_LEVEL3_CACHE_SIZE) said 320 MiB for this 32 MiB Zen 4 VM), else 32 MiB.
int64_t llc_bytes() {
  static const int64_t bytes = [] {
    int64_t b = 0;
    if (FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
      long long n = 0;
      char unit = 0;
      if (std::fscanf(f, "%lld%c", &n, &unit) >= 1)
        b = static_cast<int64_t>(n) * (unit == 'K' ? int64_t{1} << 10 : unit == 'M' ? int64_t{1} << 20
                                       : unit == 'G' ? int64_t{1} << 30 : 1);
      std::fclose(f);
    }
    return b > 0 ? b : int64_t{32} << 20;
  }();
  return bytes;
}

struct AttnPlan {
  int64_t B, Hq, Hkv, Tq, Tk, D, Dp, G;
  int64_t QB, nqb;       // query positions per task, query blocks
  int64_t KB;            // keys per inner block (multiple of 16)
  int64_t nsplit, slen;  // key splits per (b, kv head, query block), keys per split (multiple of 16)
  int64_t NG;            // 16-key groups in Tk
  float scale;
  bool prefetch;         // K + V larger than the last-level cache: prefetch the next key block (tile path)
};

// Scratch for one task: scaled q rows, a score block, and the running (m, l, acc) of every row.
// The lane path (attn_task_lanes) keeps R rounded up to whole groups of 8 lanes for m / l / alpha and
// uses qs as the transposed q (qT), s as [row group][key][8 lanes] scores, kw for widened / tail keys.
struct Scratch {
  std::vector<float> qs, s, m, l, acc, alpha, kw;
  std::vector<int64_t> qpos;
  void ensure(int64_t R, const AttnPlan& P) {
    const int64_t R8 = R >= kLaneRows ? (R + 7) / 8 * 8 : R;
    qs.resize(static_cast<size_t>(R8 * P.Dp));
    s.resize(static_cast<size_t>(R8 * P.KB));
    m.resize(static_cast<size_t>(R8));
    l.resize(static_cast<size_t>(R8));
    alpha.resize(static_cast<size_t>(R8));
    acc.resize(static_cast<size_t>(R8 * P.Dp));
  }
};

// Prefetch the K and V rows [j0, j1) (the next key block) into L2. Only for calls whose K/V cannot be
// cache-resident (AttnPlan::prefetch): there the hardware prefetcher alone left the DRAM stream short
// of bandwidth (dram-sized decode [8, 12, 12, 1, 2048, 64]: 0.82x the time with these prefetches),
// while for K/V already in L3 the extra instructions cost ~7% (gpt2-like decode, 6 MB).
template <typename KT>
inline void prefetch_rows(const KT* kb, int64_t ks, const KT* vb, int64_t vs, int64_t j0, int64_t j1, int64_t D) {
  const int64_t rb = D * static_cast<int64_t>(sizeof(KT));
  for (int64_t j = j0; j < j1; j++) {
    const char* kr = reinterpret_cast<const char*>(kb + j * ks);
    const char* vr = reinterpret_cast<const char*>(vb + j * vs);
    for (int64_t o = 0; o < rb; o += 64) {
#if defined(__GNUC__)
      __builtin_prefetch(kr + o, 0, 1);
      __builtin_prefetch(vr + o, 0, 1);
#else
      (void)kr, (void)vr;
#endif
    }
  }
}

// Rows r0..r0+NR of a task against key block [j0, j0 + nk): scores, masks, online-softmax update and
// P.V. (attn_task prefetches the next block only for calls larger than the LLC, see prefetch_rows.)
template <int NR, typename KT>
NX_ALWAYS_INLINE void block_rows(const AttnPlan& P, const KT* kb, int64_t ks, const KT* vb, int64_t vs,
                                 const uint16_t* mbits, int64_t i0, int64_t j0, int64_t nk, int64_t r0, Scratch& sc) {
  constexpr int NK = 16 / NR;
  const int64_t G = P.G, D = P.D, Dp = P.Dp;
  int64_t vis[NR], vmax = 0;
  for (int r = 0; r < NR; r++) {
    const int64_t qpos = P.Tk - P.Tq + i0 + (r0 + r) / G;
    vis[r] = std::max<int64_t>(0, std::min(nk, qpos - j0 + 1));  // keys of this block row r may see
    vmax = std::max(vmax, vis[r]);
  }
  if (vmax == 0) return;
  const int64_t ng = (vmax + 15) / 16;
  float* s0 = sc.s.data() + r0 * P.KB;
  const KT* kp[16];
  for (int64_t gi = 0; gi < ng; gi++) {
    const int64_t jj = j0 + gi * 16;
    const int64_t avail = std::min<int64_t>(16, P.Tk - jj);  // key rows that exist in memory
    for (int t = 0; t < 16; t++) kp[t] = kb + (jj + std::min<int64_t>(t, avail - 1)) * ks;
    for (int sub = 0; sub < NR; sub++)
      score_tile<NR>(sc.qs.data() + r0 * Dp, Dp, kp + sub * NK, D, s0 + gi * 16 + sub * NK, P.KB);
    // padding mask, causal limit and Tk tail -> -inf
    for (int r = 0; r < NR; r++) {
      const uint32_t bits = mbits[jj / 16] & low_bits(vis[r] - gi * 16);
      float* sr = s0 + r * P.KB + gi * 16;
#if defined(NX_ATTN_AVX512)
      _mm512_mask_storeu_ps(sr, static_cast<__mmask16>(~bits), _mm512_set1_ps(kNegInf));
#else
      for (int t = 0; t < 16; t++)
        if (!(bits >> t & 1u)) sr[t] = kNegInf;
#endif
    }
  }
  float alpha[NR];
  for (int r = 0; r < NR; r++) {
    float* sr = s0 + r * P.KB;
    const int64_t row = r0 + r;
    const float bm = max_of(sr, ng * 16);
    if (bm == kNegInf) {  // nothing visible to this row yet: state unchanged, p = 0
      alpha[r] = 1.0f;
      std::fill(sr, sr + ng * 16, 0.0f);
      continue;
    }
    const float mold = sc.m[row];
    const float mnew = std::max(mold, bm);
    alpha[r] = mold == kNegInf ? 0.0f : std::exp(mold - mnew);
    const float psum = exp_sub_sum(sr, ng * 16, mnew);
    sc.l[row] = sc.l[row] * alpha[r] + psum;
    sc.m[row] = mnew;
  }
  pv_rows<NR>(sc.acc.data() + r0 * Dp, Dp, alpha, s0, P.KB, 1, vmax, vb + j0 * vs, vs, D);
}

// One task: rows (query position i0 + ii, head g of the group) for ii < nq, g < G, keys [jb, je).
// Leaves the unnormalised state in sc.m / sc.l / sc.acc.
template <typename KT>
NX_NOINLINE void attn_task(const AttnPlan& P, const KView& q, const KT* kb, int64_t ks, const KT* vb, int64_t vs,
                           const uint16_t* mbits, int64_t b, int64_t kh, int64_t i0, int64_t nq, int64_t jb,
                           int64_t je, Scratch& sc) {
  const int64_t G = P.G, D = P.D, Dp = P.Dp, R = nq * G;
  sc.ensure(R, P);
  // q rows, scaled, zero-padded to Dp
  for (int64_t ii = 0; ii < nq; ii++)
    for (int64_t g = 0; g < G; g++) {
      float* dst = sc.qs.data() + (ii * G + g) * Dp;
      const int64_t qo = b * q.strides[0] + (kh * G + g) * q.strides[1] + (i0 + ii) * q.strides[2];
      if (q.dtype == DType::F32 && q.strides[3] == 1) {
        const float* src = q.ptr<float>() + qo;
        for (int64_t d = 0; d < D; d++) dst[d] = src[d] * P.scale;
      } else {
        for (int64_t d = 0; d < D; d++) dst[d] = load_f32(q.data, q.dtype, qo + d * q.strides[3]) * P.scale;
      }
      for (int64_t d = D; d < Dp; d++) dst[d] = 0.0f;
    }
  std::fill(sc.m.begin(), sc.m.begin() + R, kNegInf);
  std::fill(sc.l.begin(), sc.l.begin() + R, 0.0f);
  std::fill(sc.acc.begin(), sc.acc.begin() + R * Dp, 0.0f);
  // causal: the last query row of this task sees keys < Tk - Tq + i0 + nq
  je = std::min(je, P.Tk - P.Tq + i0 + nq);
  for (int64_t j0 = jb; j0 < je; j0 += P.KB) {
    const int64_t nk = std::min(P.KB, je - j0);
    if (P.prefetch) prefetch_rows(kb, ks, vb, vs, j0 + P.KB, std::min(j0 + 2 * P.KB, je), D);
    for (int64_t r0 = 0; r0 < R;) {
      const int64_t rem = R - r0;
      const int nr = rem >= 4 ? 4 : rem >= 2 ? 2 : 1;
      if (nr == 4) block_rows<4>(P, kb, ks, vb, vs, mbits, i0, j0, nk, r0, sc);
      else if (nr == 2) block_rows<2>(P, kb, ks, vb, vs, mbits, i0, j0, nk, r0, sc);
      else block_rows<1>(P, kb, ks, vb, vs, mbits, i0, j0, nk, r0, sc);
      r0 += nr;
    }
  }
}

// ---- lane path: query rows in SIMD lanes --------------------------------------------------------------
// For tasks with at least 8 rows (GQA decode: the G query heads of one kv head) scores are computed with
// the rows of a group of 8 in the 8 lanes of a vector: s[key][lane] = sum_d k[key][d] * qT[d][lane], one
// FMA per (key, d) with k[key][d] broadcast. No horizontal reductions at all, and the softmax statistics
// (max, sum, rescale factor) of 8 rows are one vector. P.V then runs the register tiles above with the
// probabilities read at key stride 8.

// dst[0, D) = f32 of a K row stored as bf16 / f16.
template <typename KT>
inline void widen_row(const KT* src, float* dst, int64_t D) {
  int64_t d = 0;
#if defined(NX_ATTN_AVX512)
  for (; d + 16 <= D; d += 16) _mm512_storeu_ps(dst + d, load16(src + d));
  if (d < D) _mm512_mask_storeu_ps(dst + d, simd::tail_mask(D - d), load16(src + d, simd::tail_mask(D - d)));
#else
  for (; d < D; d++) dst[d] = to_f(src[d]);
#endif
}

// s[kk * 8 + lane] = sum_{d < D} k[kk * ks + d] * qT[d * 8 + lane] for kk < NKEY (f32 key rows).
// Kept out of line: inlined into the task loop, GCC ran short of registers and reloaded qT for every FMA.
template <int NKEY>
NX_NOINLINE void lane_scores(const float* qT, const float* k, int64_t ks, int64_t D, float* s) {
#if defined(NX_ATTN_AVX512)
  __m256 acc[NKEY];
#pragma GCC unroll 16
  for (int kk = 0; kk < NKEY; kk++) acc[kk] = _mm256_setzero_ps();
  int64_t d0 = 0;
  for (; d0 + 16 <= D; d0 += 16) {
    __m256 qv[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++) qv[i] = _mm256_loadu_ps(qT + (d0 + i) * 8);
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++)
#pragma GCC unroll 16
      for (int kk = 0; kk < NKEY; kk++)
        acc[kk] = _mm256_fmadd_ps(_mm256_set1_ps(k[kk * ks + d0 + i]), qv[i], acc[kk]);
  }
  for (; d0 < D; d0++) {
    const __m256 qv = _mm256_loadu_ps(qT + d0 * 8);
#pragma GCC unroll 16
    for (int kk = 0; kk < NKEY; kk++) acc[kk] = _mm256_fmadd_ps(_mm256_set1_ps(k[kk * ks + d0]), qv, acc[kk]);
  }
#pragma GCC unroll 16
  for (int kk = 0; kk < NKEY; kk++) _mm256_storeu_ps(s + kk * 8, acc[kk]);
#else
  for (int kk = 0; kk < NKEY; kk++) {
    float a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t d = 0; d < D; d++) {
      const float kd = k[kk * ks + d];
      for (int l = 0; l < 8; l++) a[l] += kd * qT[d * 8 + l];
    }
    for (int l = 0; l < 8; l++) s[kk * 8 + l] = a[l];
  }
#endif
}

#if defined(NX_ATTN_AVX512)
inline __m256 hi256(__m512 v) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); }
#endif

// Softmax update of one row group over n8 keys (a multiple of 8) of s (8 lanes per key, -inf = not
// visible): m, l, alpha (8 lanes each) updated in place as in block_rows, s overwritten with p.
inline void lane_softmax(float* s, int64_t n8, float* m, float* l, float* alpha) {
#if defined(NX_ATTN_AVX512)
  const __m512 ninf = _mm512_set1_ps(kNegInf);
  __m512 mx = ninf;
  for (int64_t j = 0; j < n8; j += 2) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + j * 8));
  const __m256 bm = _mm256_max_ps(_mm512_castps512_ps256(mx), hi256(mx));
  const __m256 mold = _mm256_loadu_ps(m);
  const __m256 mnew = _mm256_max_ps(mold, bm);
  // alpha = e^(mold - mnew); 0 where nothing was seen before (the state is all zeros then)
  const __mmask8 seen = _mm256_cmp_ps_mask(mold, _mm256_set1_ps(kNegInf), _CMP_NEQ_OQ);
  const __m256 e = _mm512_castps512_ps256(simd::v_exp(_mm512_castps256_ps512(_mm256_sub_ps(mold, mnew))));
  const __m256 al = _mm256_maskz_mov_ps(seen, e);
  const __m512 mn2 = _mm512_insertf32x8(_mm512_castps256_ps512(mnew), mnew, 1);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n8; j += 2) {
    const __m512 x = _mm512_loadu_ps(s + j * 8);
    const __mmask16 valid = _mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ);
    const __m512 p = _mm512_maskz_mov_ps(valid, simd::v_exp(_mm512_sub_ps(x, mn2)));
    _mm512_storeu_ps(s + j * 8, p);
    sum = _mm512_add_ps(sum, p);
  }
  const __m256 ps = _mm256_add_ps(_mm512_castps512_ps256(sum), hi256(sum));
  _mm256_storeu_ps(l, _mm256_fmadd_ps(_mm256_loadu_ps(l), al, ps));
  _mm256_storeu_ps(m, mnew);
  _mm256_storeu_ps(alpha, al);
#else
  for (int lane = 0; lane < 8; lane++) {
    float bm = kNegInf;
    for (int64_t j = 0; j < n8; j++) bm = std::max(bm, s[j * 8 + lane]);
    const float mold = m[lane], mnew = std::max(mold, bm);
    const float al = mold == kNegInf ? 0.0f : std::exp(mold - mnew);
    float sum = 0;
    for (int64_t j = 0; j < n8; j++) {
      float& x = s[j * 8 + lane];
      x = x == kNegInf ? 0.0f : std::exp(x - mnew);
      sum += x;
    }
    l[lane] = l[lane] * al + sum;
    m[lane] = mnew;
    alpha[lane] = al;
  }
#endif
}

template <typename KT>
NX_NOINLINE void attn_task_lanes(const AttnPlan& P, const KView& q, const KT* kb, int64_t ks, const KT* vb,
                                 int64_t vs, const uint16_t* mbits, int64_t b, int64_t kh, int64_t i0, int64_t nq,
                                 int64_t jb, int64_t je, Scratch& sc) {
  const int64_t G = P.G, D = P.D, Dp = P.Dp, R = nq * G, RG = (R + 7) / 8, KB = P.KB;
  sc.ensure(R, P);
  constexpr bool kF32 = std::is_same<KT, float>::value;
  if (!kF32) sc.kw.resize(static_cast<size_t>(KB * D));
  else sc.kw.resize(static_cast<size_t>(8 * D));
  // qT[rg][d][lane] = scale * q[row rg * 8 + lane][d]; padded lanes 0
  float* qT = sc.qs.data();
  std::fill(qT, qT + RG * 8 * D, 0.0f);
  for (int64_t r = 0; r < R; r++) {
    const int64_t ii = r / G, g = r % G;
    const int64_t qo = b * q.strides[0] + (kh * G + g) * q.strides[1] + (i0 + ii) * q.strides[2];
    float* dst = qT + (r / 8) * 8 * D + r % 8;
    if (q.dtype == DType::F32 && q.strides[3] == 1) {
      const float* src = q.ptr<float>() + qo;
      for (int64_t d = 0; d < D; d++) dst[d * 8] = src[d] * P.scale;
    } else {
      for (int64_t d = 0; d < D; d++) dst[d * 8] = load_f32(q.data, q.dtype, qo + d * q.strides[3]) * P.scale;
    }
  }
  // query position of every lane (padded lanes: the last row's, they are never written out)
  std::vector<int64_t>& qpos = sc.qpos;
  qpos.resize(static_cast<size_t>(RG * 8));
  for (int64_t r = 0; r < RG * 8; r++) qpos[r] = P.Tk - P.Tq + i0 + std::min(r, R - 1) / G;
  const int64_t qmin = qpos[0], qmax = qpos[R - 1];
  std::fill(sc.m.begin(), sc.m.begin() + RG * 8, kNegInf);
  std::fill(sc.l.begin(), sc.l.begin() + RG * 8, 0.0f);
  std::fill(sc.acc.begin(), sc.acc.begin() + R * Dp, 0.0f);
  je = std::min(je, qmax + 1);  // causal: no row of this task sees a later key
  auto scores_softmax = [&](int64_t j0, int64_t n) {
    const int64_t n8 = (n + 7) / 8 * 8;
    float* s = sc.s.data();
    // f32 key rows of this block: the cache itself, or widened into kw (rows past Tk zero)
    const float* kf;
    int64_t kfs;
    if constexpr (kF32) {
      kf = kb + j0 * ks;
      kfs = ks;
    } else {
      for (int64_t j = 0; j < n8; j++) {
        float* dst = sc.kw.data() + j * D;
        if (j0 + j < P.Tk) widen_row(kb + (j0 + j) * ks, dst, D);
        else std::fill(dst, dst + D, 0.0f);
      }
      kf = sc.kw.data();
      kfs = D;
    }
    for (int64_t g8 = 0; g8 < n8; g8 += 8) {
      const float* kg = kf + g8 * kfs;
      int64_t kgs = kfs;
      if (kF32 && j0 + g8 + 8 > P.Tk) {  // the last keys of the cache: copy, zero the missing rows
        const int64_t avail = P.Tk - j0 - g8;
        for (int64_t j = 0; j < 8; j++) {
          float* dst = sc.kw.data() + j * D;
          if (j < avail) std::memcpy(dst, kg + j * kfs, static_cast<size_t>(D) * sizeof(float));
          else std::fill(dst, dst + D, 0.0f);
        }
        kg = sc.kw.data();
        kgs = D;
      }
      for (int64_t rg = 0; rg < RG; rg++) lane_scores<8>(qT + rg * 8 * D, kg, kgs, D, s + (rg * KB + g8) * 8);
    }
    // masks: padding / past Tk (mbits) for every row, causal limit per lane (j0 is a multiple of 16)
    for (int64_t j = 0; j < n8; j++) {
      const int64_t jj = j0 + j;
      if (j % 16 == 0 && jj + 15 <= qmin && mbits[jj / 16] == 0xFFFFu) {  // 16 keys every row sees
        j += 15;
        continue;
      }
      const bool key_ok = jj < P.Tk && (mbits[jj / 16] >> (jj % 16) & 1u);
      if (key_ok && jj <= qmin) continue;
      for (int64_t rg = 0; rg < RG; rg++) {
        float* sr = s + (rg * KB + j) * 8;
        for (int lane = 0; lane < 8; lane++)
          if (!key_ok || jj > qpos[rg * 8 + lane]) sr[lane] = kNegInf;
      }
    }
    for (int64_t rg = 0; rg < RG; rg++)
      lane_softmax(s + rg * KB * 8, n8, sc.m.data() + rg * 8, sc.l.data() + rg * 8, sc.alpha.data() + rg * 8);
  };
  // P.V: tiles of 4 (2, 1) rows inside a row group; p of row r, key j at s[(r / 8 * KB + j) * 8 + r % 8]
  auto pv_block = [&](int64_t j0, int64_t n) {
    for (int64_t r0 = 0; r0 < R;) {
      const int64_t rem = std::min(R - r0, 8 - r0 % 8);
      const int nr = rem >= 4 ? 4 : rem >= 2 ? 2 : 1;
      const float* p = sc.s.data() + (r0 / 8) * KB * 8 + r0 % 8;
      float* acc = sc.acc.data() + r0 * Dp;
      const float* al = sc.alpha.data() + r0;
      if (nr == 4) pv_rows<4>(acc, Dp, al, p, 1, 8, n, vb + j0 * vs, vs, D);
      else if (nr == 2) pv_rows<2>(acc, Dp, al, p, 1, 8, n, vb + j0 * vs, vs, D);
      else pv_rows<1>(acc, Dp, al, p, 1, 8, n, vb + j0 * vs, vs, D);
      r0 += nr;
    }
  };
  for (int64_t j0 = jb; j0 < je; j0 += KB) {
    const int64_t n = std::min(KB, je - j0);  // keys some row may see
    scores_softmax(j0, n);
    pv_block(j0, n);
  }
}

void write_out_row(const KView& out, int64_t b, int64_t h, int64_t i, const float* acc, float inv, int64_t D) {
  const int64_t oo = b * out.strides[0] + h * out.strides[1] + i * out.strides[2];
  if (out.dtype == DType::F32 && out.strides[3] == 1) {
    float* o = out.ptr<float>() + oo;
    for (int64_t d = 0; d < D; d++) o[d] = acc[d] * inv;
  } else {
    for (int64_t d = 0; d < D; d++) store_f32(out.data, out.dtype, oo + d * out.strides[3], acc[d] * inv);
  }
}

// A cursor over one range of consecutive tasks (own cache line: the threads claim from them concurrently).
struct alignas(64) TaskRange {
  std::atomic<int64_t> next{0};
  int64_t end = 0;
};

template <typename KT>
void attention_impl(const AttnPlan& P, const KView& q, const KT* kb, const int64_t* kstr, const KT* vb,
                    const int64_t* vstr, const std::vector<uint16_t>& mbits, const KView& out) {
  const int64_t base_tasks = P.B * P.Hkv * P.nqb;
  const int64_t ntasks = base_tasks * P.nsplit;
  const int64_t Rmax = P.QB * P.G, Dp = P.Dp;
  // partial results of split tasks: per task and row, (m, l, acc[Dp]); per (b, kv head, query block) the
  // number of its splits finished so far: the task that finishes the last one merges them
  std::vector<float> part;
  std::unique_ptr<std::atomic<int32_t>[]> done;
  if (P.nsplit > 1) {
    part.resize(static_cast<size_t>(ntasks * Rmax * (Dp + 2)));
    done.reset(new std::atomic<int32_t>[static_cast<size_t>(base_tasks)]);
    for (int64_t i = 0; i < base_tasks; i++) done[i].store(0, std::memory_order_relaxed);
  }
  // merge: M = max m_s, out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s
  auto merge = [&](int64_t bt, std::vector<float>& acc) {
    acc.resize(static_cast<size_t>(Dp));
    const int64_t qb = bt % P.nqb, kh = (bt / P.nqb) % P.Hkv, b = bt / (P.nqb * P.Hkv);
    const int64_t i0 = qb * P.QB, nq = std::min(P.QB, P.Tq - i0), R = nq * P.G;
    for (int64_t r = 0; r < R; r++) {
      float M = kNegInf;
      for (int64_t s = 0; s < P.nsplit; s++) M = std::max(M, part[((bt * P.nsplit + s) * Rmax + r) * (Dp + 2)]);
      std::fill(acc.begin(), acc.end(), 0.0f);
      float L = 0;
      if (M != kNegInf) {
        for (int64_t s = 0; s < P.nsplit; s++) {
          const float* pr = part.data() + ((bt * P.nsplit + s) * Rmax + r) * (Dp + 2);
          if (pr[0] == kNegInf) continue;
          const float w = std::exp(pr[0] - M);
          L += w * pr[1];
          for (int64_t d = 0; d < P.D; d++) acc[d] += w * pr[2 + d];
        }
      }
      write_out_row(out, b, kh * P.G + r % P.G, i0 + r / P.G, acc.data(), L > 0 ? 1.0f / L : 0.0f, P.D);
    }
  };
  auto run = [&](int64_t task, Scratch& sc, std::vector<float>& macc) {
    const int64_t split = task % P.nsplit;
    const int64_t bt = task / P.nsplit;
    const int64_t qb = bt % P.nqb, kh = (bt / P.nqb) % P.Hkv, b = bt / (P.nqb * P.Hkv);
    const int64_t i0 = qb * P.QB, nq = std::min(P.QB, P.Tq - i0);
    const int64_t jb = split * P.slen, je = std::min(P.Tk, jb + P.slen);
    const KT* kp = kb + b * kstr[0] + kh * kstr[1];
    const KT* vp = vb + b * vstr[0] + kh * vstr[1];
    if (nq * P.G >= kLaneRows)
      attn_task_lanes(P, q, kp, kstr[2], vp, vstr[2], mbits.data() + b * P.NG, b, kh, i0, nq, jb, je, sc);
    else
      attn_task(P, q, kp, kstr[2], vp, vstr[2], mbits.data() + b * P.NG, b, kh, i0, nq, jb, je, sc);
    const int64_t R = nq * P.G;
    if (P.nsplit == 1) {
      for (int64_t r = 0; r < R; r++) {
        const float l = sc.l[r];
        write_out_row(out, b, kh * P.G + r % P.G, i0 + r / P.G, sc.acc.data() + r * Dp, l > 0 ? 1.0f / l : 0.0f, P.D);
      }
      return;
    }
    float* pp = part.data() + task * Rmax * (Dp + 2);
    for (int64_t r = 0; r < R; r++) {
      float* pr = pp + r * (Dp + 2);
      pr[0] = sc.m[r];
      pr[1] = sc.l[r];
      std::memcpy(pr + 2, sc.acc.data() + r * Dp, static_cast<size_t>(Dp) * sizeof(float));
    }
    if (done[bt].fetch_add(1, std::memory_order_acq_rel) == P.nsplit - 1) merge(bt, macc);
  };
  // Tasks are claimed, not dealt: one range of consecutive tasks per thread, each with an atomic cursor.
  // A thread drains its own range first (the same K/V rows every call, so they stay in its L2), then
  // helps with the others, so a worker that wakes late or is descheduled does not hold the call up.
  const int64_t nr = std::max<int64_t>(1, std::min<int64_t>(num_threads(), ntasks));
  std::vector<TaskRange> ranges(static_cast<size_t>(nr));
  for (int64_t c = 0; c < nr; c++) {
    ranges[c].next.store(ntasks * c / nr, std::memory_order_relaxed);
    ranges[c].end = ntasks * (c + 1) / nr;
  }
  parallel_for(0, nr, 1, [&](int64_t lo, int64_t hi) {
    Scratch sc;
    std::vector<float> macc;
    for (int64_t c0 = lo; c0 < hi; c0++)
      for (int64_t k = 0; k < nr; k++) {
        TaskRange& tr = ranges[(c0 + k) % nr];
        for (;;) {
          const int64_t task = tr.next.fetch_add(1, std::memory_order_relaxed);
          if (task >= tr.end) break;
          run(task, sc, macc);
        }
      }
  });
}

}  // namespace

void attention(const KView& q, const KView& k, const KView& v, const KView* mask, float scale, const KView& out) {
  AttnPlan P;
  P.B = q.shape[0];
  P.Hq = q.shape[1];
  P.Tq = q.shape[2];
  P.D = q.shape[3];
  P.Hkv = k.shape[1];
  P.Tk = k.shape[2];
  if (P.B == 0 || P.Hq == 0 || P.Tq == 0 || P.D == 0) return;
  P.G = P.Hq / P.Hkv;
  P.Dp = (P.D + 15) / 16 * 16;
  P.scale = scale;
  // ~32 rows (query positions x heads of the group) per task; keys in blocks of ~16 KiB of f32 K rows
  P.QB = std::min(P.Tq, std::max<int64_t>(1, 32 / P.G));
  P.nqb = (P.Tq + P.QB - 1) / P.QB;
  P.KB = std::max<int64_t>(16, std::min<int64_t>(128, (4096 / P.D) / 16 * 16));
  P.NG = (P.Tk + 15) / 16;
  P.prefetch = 2 * P.B * P.Hkv * P.Tk * P.D * static_cast<int64_t>(dtype_size(k.dtype)) > llc_bytes();
  // split the keys when there are too few tasks to keep every thread busy (decode with few kv heads)
  const int64_t base = P.B * P.Hkv * P.nqb;
  const int64_t want = 4 * static_cast<int64_t>(num_threads());
  P.nsplit = 1;
  if (base < want && P.Tk >= 512) P.nsplit = std::min((want + base - 1) / base, P.Tk / 256);
  P.nsplit = std::max<int64_t>(1, P.nsplit);
  P.slen = ((P.Tk + P.nsplit - 1) / P.nsplit + 15) / 16 * 16;
  P.nsplit = std::max<int64_t>(1, (P.Tk + P.slen - 1) / P.slen);

  // key validity bits per (b, 16-key group): padding mask and the tail past Tk
  std::vector<uint16_t> mbits(static_cast<size_t>(std::max<int64_t>(1, P.B * P.NG)), 0);
  for (int64_t b = 0; b < P.B; b++)
    for (int64_t j = 0; j < P.Tk; j++) {
      const bool ok = !mask || load_f32(mask->data, mask->dtype, b * mask->strides[0] + j * mask->strides[1]) != 0.0f;
      if (ok) mbits[b * P.NG + j / 16] |= static_cast<uint16_t>(1u << (j % 16));
    }

  // K/V in their own dtype when f32/bf16/f16 with a contiguous last dim, else a dense f32 copy
  const bool same = k.dtype == v.dtype && dtype_is_float(k.dtype) && k.strides[3] == 1 && v.strides[3] == 1;
  if (same) {
    if (k.dtype == DType::F32)
      attention_impl(P, q, k.ptr<const float>(), k.strides, v.ptr<const float>(), v.strides, mbits, out);
    else if (k.dtype == DType::BF16)
      attention_impl(P, q, k.ptr<const Bf16>(), k.strides, v.ptr<const Bf16>(), v.strides, mbits, out);
    else
      attention_impl(P, q, k.ptr<const F16>(), k.strides, v.ptr<const F16>(), v.strides, mbits, out);
    return;
  }
  const int64_t n = P.B * P.Hkv * P.Tk * P.D;
  std::vector<float> kd(static_cast<size_t>(n)), vd(static_cast<size_t>(n));
  const int64_t dstr[4] = {P.Hkv * P.Tk * P.D, P.Tk * P.D, P.D, 1};
  parallel_for(0, P.B * P.Hkv * P.Tk, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t row = lo; row < hi; row++) {
      const int64_t j = row % P.Tk, kh = (row / P.Tk) % P.Hkv, b = row / (P.Tk * P.Hkv);
      const int64_t ko = b * k.strides[0] + kh * k.strides[1] + j * k.strides[2];
      const int64_t vo = b * v.strides[0] + kh * v.strides[1] + j * v.strides[2];
      for (int64_t d = 0; d < P.D; d++) {
        kd[row * P.D + d] = load_f32(k.data, k.dtype, ko + d * k.strides[3]);
        vd[row * P.D + d] = load_f32(v.data, v.dtype, vo + d * v.strides[3]);
      }
    }
  });
  attention_impl(P, q, static_cast<const float*>(kd.data()), dstr, static_cast<const float*>(vd.data()), dstr, mbits, out);
}

}  // namespace fast
}  // namespace nx
