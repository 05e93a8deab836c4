// gemm.cpp: out[M,N] = a[M,K] @ b[K,N] (+ bias[N]), f32 accumulate (contract in gemm.h).
//
//   ref::gemm   a plain triple loop over the strided views; b and bias of any dtype via load_f32. It
//               is the oracle for test/cpp/gemm_test.cpp and favours clarity over speed.
//   fast::gemm  three paths, picked per call:
//     * GEMM (M > kStreamMaxM = 8): BLIS-style cache blocking. Loops jc (N by NC) > pc (K by KC) > ic
//       (M by MC) > jr (NR-wide micro-panels of packed B) > ir (MR-tall micro-panels of packed A), with
//       an MR x NR register-blocked micro-kernel (AVX-512: 8 x 48 = 24 zmm accumulators, 3 B vectors,
//       one broadcast of A per row; alone it runs at ~97% of the FMA peak). B is widened bf16/f16 -> f32
//       and transposed (for the nn.Linear layout, stride(0) == 1) while it is packed, so the
//       micro-kernel only ever sees f32. When a thread's rows fit one A block (prefill-sized M), B is
//       packed a few micro-panels at a time right before use instead of a whole KC x NC block first.
//       Threads get disjoint 2-D blocks of out (split N when N is large, M otherwise); each packs its
//       own A and B slices into thread-local scratch, so threads never wait on each other.
//     * matrix-vector (M <= kMatvecMaxM, decode): streams the weights once. Row-major [K,N] b: threads
//       split K (each streams one contiguous block of rows; partial sums added at the end), axpy of RR
//       rows at a time into an accumulator strip. Transposed b (W [N,K]): threads split N, dot products
//       of a[m,:] with 4-8 rows of W at a time. bf16/f16 widen in registers (bf16 is a 16-bit shift).
//       The AVX512_BF16 dot-product instructions are NOT used: they would round a to bf16 too, and the
//       contract accumulates a in f32 (and the path is bound by memory, not arithmetic, anyway).
//       4 < M <= 8: the same kernels over groups of rows of a, walking the weights in L2-sized chunks
//       so each chunk is read from memory once for all groups (stream_part).
//     * anything else (b with no unit stride) packs / loads through load_f32: correct, not fast.
//   fast::gemm_packed  b packed once by fast::pack_weight into the micro-kernel's panel layout (gemm.h):
//     * GEMM (M > MR): per K block the rows of a are packed once into a shared buffer (threads split the
//       row panels), then runs of panels (guided sizes, shrinking towards the end: for_panel_runs) or,
//       with few panels, units of (row block, panel run) are claimed from a shared counter; each panel of
//       a run sweeps the rows through micro_kernel_pf, which also prefetches the run's next panel, spread
//       over the sweep. Dynamic claims keep a thread that lost its core to another process from holding
//       the whole product back (a static half each: 6-12% slower on the GPT-2 matmuls under load). No B packing at all: at M = 128 that
//       was ~15% of the time (a read of every weight from memory, a write and a re-read of the packed
//       copy), and the panel's first use waited on memory. Measured on the GPT-2 124M matmuls (12 layers
//       of distinct weights, so weights come from DRAM as in a forward pass), 2 threads: 172 -> 145 ms at
//       M = 128 (0.78 -> 0.93 of the FMA peak).
//     * streaming (M <= MR, decode): a packed once for all of K; runs of panels are claimed the same way; stream_kernel walks 4 (1-2 rows), 2 (3-4) or 1 (5-8) consecutive panels at once, front to back: 4 streams per core keep more lines in
//       flight than one (with one stream it was 5-15% slower than the matvec path below; with 4, on par
//       at M = 1 and 1.5x faster at M = 4..8).
//     * the K blocking (k_block) depends on K alone and every path sums a row's terms in the same order,
//       so a row's result does not depend on M, the path or the thread count.
//   Non-contiguous a is handled by the packing (GEMM) or a dense copy (matvec); out with a column
//   stride != 1 is computed into a dense scratch and then copied.
//
// ISA: compiled per the build's -m flags: AVX-512F (zmm, 16 lanes), AVX2+FMA (ymm, 8 lanes), SSE2
// (xmm, 4 lanes, mul+add) or scalar. The AVX-512 path is what the benchmarks measure.
//
// Shapes: a [M,K] f32; b [K,N] f32/bf16/f16; bias [N] or nullptr; out [M,N] f32.
// Bench: `g++ -O3 -std=c++17 -march=native -I. bench/cpp/gemm_bench.cpp kernels/cpu/gemm.cpp
//         kernels/cpu/probe.cpp native/src/core/threadpool.cpp -ldl -lpthread -o /tmp/gemm_bench &&
//         OPENBLAS_CORETYPE=Cooperlake OPENBLAS_NUM_THREADS=2 /tmp/gemm_bench` (see that file).
#include "gemm.h"

#include <algorithm>
#include <array>
#include <cstddef>
#include <utility>
#include <atomic>
#include "elementwise.h"
#include <cstdlib>
#include <string>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__SSE2__)
#include <immintrin.h>
#endif

namespace nx {

// ------------------------------------------------------------------------------------------------
// reference
// ------------------------------------------------------------------------------------------------
namespace ref {
void gemm(const KView& a, const KView& b, const KView* bias, const KView& out) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  for (int64_t i = 0; i < M; i++) {
    for (int64_t j = 0; j < N; j++) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; k++) {
        acc += load_f32(a.data, a.dtype, i * a.stride(0) + k * a.stride(1)) *
               load_f32(b.data, b.dtype, k * b.stride(0) + j * b.stride(1));
      }
      if (bias != nullptr) acc += load_f32(bias->data, bias->dtype, j * bias->stride(0));
      store_f32(out.data, out.dtype, i * out.stride(0) + j * out.stride(1), acc);
    }
  }
}
}  // namespace ref

// ------------------------------------------------------------------------------------------------
// fast
// ------------------------------------------------------------------------------------------------
namespace {

// ---- a minimal SIMD layer: vf holds VL floats ----
#if defined(__AVX512F__)
using vf = __m512;
constexpr int VL = 16;
constexpr int MR = 8, NV = 3;  // micro-tile 8 x 48: 24 accumulators + 3 B + 1 broadcast of 32 zmm
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vbcast(float x) { return _mm512_set1_ps(x); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
inline vf vload_bf16(const uint16_t* p) {
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline vf vload_f16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#elif defined(__AVX2__) && defined(__FMA__)
using vf = __m256;
constexpr int VL = 8;
constexpr int MR = 6, NV = 2;  // 6 x 16: 12 accumulators + 2 B + 1 broadcast of 16 ymm
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf vbcast(float x) { return _mm256_set1_ps(x); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline float vsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline vf vload_bf16(const uint16_t* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline vf vload_f16(const uint16_t* p) {
#if defined(__F16C__)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  alignas(32) float t[8];
  for (int i = 0; i < 8; i++) t[i] = f16_to_f32(p[i]);
  return _mm256_load_ps(t);
#endif
}
#elif defined(__SSE2__)
using vf = __m128;
constexpr int VL = 4;
constexpr int MR = 4, NV = 2;  // 4 x 8: 8 accumulators + 2 B + 1 broadcast of 16 xmm
inline vf vzero() { return _mm_setzero_ps(); }
inline vf vload(const float* p) { return _mm_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm_storeu_ps(p, v); }
inline vf vbcast(float x) { return _mm_set1_ps(x); }
inline vf vfma(vf a, vf b, vf c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }  // no FMA in SSE2
inline vf vadd(vf a, vf b) { return _mm_add_ps(a, b); }
inline float vsum(vf v) {
  __m128 s = _mm_add_ps(v, _mm_movehl_ps(v, v));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
inline vf vload_bf16(const uint16_t* p) {
  __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), h));  // bf16 bits into the high half
}
inline vf vload_f16(const uint16_t* p) {
  return _mm_setr_ps(f16_to_f32(p[0]), f16_to_f32(p[1]), f16_to_f32(p[2]), f16_to_f32(p[3]));
}
#else
struct vf {
  float x;
};
constexpr int VL = 1;
constexpr int MR = 4, NV = 4;
inline vf vzero() { return {0.0f}; }
inline vf vload(const float* p) { return {*p}; }
inline void vstore(float* p, vf v) { *p = v.x; }
inline vf vbcast(float x) { return {x}; }
inline vf vfma(vf a, vf b, vf c) { return {a.x * b.x + c.x}; }
inline vf vadd(vf a, vf b) { return {a.x + b.x}; }
inline float vsum(vf v) { return v.x; }
inline vf vload_bf16(const uint16_t* p) { return {bf16_to_f32(*p)}; }
inline vf vload_f16(const uint16_t* p) { return {f16_to_f32(*p)}; }
#endif

// Pins a loaded vector in a register. Without it GCC re-issues a weight load as a memory operand of
// every FMA that uses it (one per row of a); in the memory-bound matvec those duplicate loads of a
// line that is still in flight took load-queue slots and cut the lines in flight: M=2 read the
// weights at 21 GB/s instead of 28 GB/s.
#if defined(__AVX512F__)
inline vf pin(vf v) {  // "v": any of zmm0-31 ("x" would be zmm0-15 only)
  asm("" : "+v"(v));
  return v;
}
#elif defined(__AVX2__) || defined(__SSE2__)
inline vf pin(vf v) {
  asm("" : "+x"(v));
  return v;
}
#else
inline vf pin(vf v) { return v; }
#endif

constexpr int NR = NV * VL;
constexpr int kMatvecMaxM = 4;  // M <= this streams the weights (decode, tiny batches)
// M <= this still streams the weights, rows of a taken in groups (stream_part). Measured on one core
// against the GEMM path (K = N = 4096): streaming is ~2x faster at M = 5..7, even at M = 8 (kn 9.9 vs
// 9.3 ms, nk_t 7.4 vs 8.6 ms), and slower from M = 12 on, where packing B pays off.
constexpr int kStreamMaxM = 8;
// Blocking (Zen4: L1d 32 KiB, L2 1 MiB per core, L3 32 MiB shared). Measured at M=128, N=3072, K=768
// on one core: KC 768 > 512 > 384 > 256 > 128 (99 vs 95 vs 90 GFLOP/s for 768 / 384 / 128): a long K
// block amortises the micro-kernel's C update and call overhead, and the B micro-panel is read from L2
// either way. Slabs of 1..8 micro-panels packed at once measured alike at KC 384; at KC 768, 1 is best.
constexpr int64_t KC_MAX = 768;  // B micro-panel KC x NR = 144 KiB and A block MC x KC live in L2
constexpr int64_t MC_MAX = 192;  // A block 192 x 768 x 4 = 576 KiB
constexpr int64_t NC_MAX = 3072;  // B block (non-fused path) 768 x 3072 x 4 = 9 MiB per thread, in L3
constexpr int64_t kSlab = 1;  // micro-panels packed together in the fused path

// Element loaders: one type per b dtype so inner loops are specialised at compile time.
struct LdF32 {
  using T = float;
  static vf vec(const T* p) { return vload(p); }
  static float one(const T* p) { return *p; }
};
struct LdBF16 {
  using T = uint16_t;
  static vf vec(const T* p) { return vload_bf16(p); }
  static float one(const T* p) { return bf16_to_f32(*p); }
};
struct LdF16 {
  using T = uint16_t;
  static vf vec(const T* p) { return vload_f16(p); }
  static float one(const T* p) { return f16_to_f32(*p); }
};

// Grow-only, 64-byte-aligned scratch, one per thread and purpose (pool threads live for the process,
// so after the first call no allocation or page fault happens in the hot path).
struct Scratch {
  float* p = nullptr;
  size_t cap = 0;
  float* get(size_t n) {
    if (n > cap) {
      std::free(p);
      cap = std::max(n, cap * 2);
      p = static_cast<float*>(std::aligned_alloc(64, (cap * sizeof(float) + 63) / 64 * 64));
      if (p == nullptr) throw Error("INTERNAL", "gemm: out of memory for packing scratch");
    }
    return p;
  }
  ~Scratch() { std::free(p); }
};
thread_local Scratch t_apack, t_bpack;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- micro-kernel: C[ROWS x NR] (op)= Ap[kc x MR]^T Bp[kc x NR] ----
// mode 0: C = acc; 1: C = acc + bias; 2: C += acc. ncols < NR writes only the first ncols columns.
// The micro-kernels' pieces (force-inlined, so each kernel compiles as if written out):
// zero_tile clears the accumulators and prefetches the C rows; k_step adds one k term,
// acc[r] += A[k][r] * B[k][0..NR), every accumulator in the same order in every kernel.
template <int ROWS>
__attribute__((always_inline)) inline void zero_tile(vf (&acc)[ROWS][NV], const float* c, int64_t ldc) {
#pragma GCC unroll 16
  for (int r = 0; r < ROWS; r++)
#pragma GCC unroll 4
    for (int j = 0; j < NV; j++) acc[r][j] = vzero();
  for (int r = 0; r < ROWS; r++) __builtin_prefetch(c + r * ldc, 1);
}
template <int ROWS>
__attribute__((always_inline)) inline void k_step(vf (&acc)[ROWS][NV], const float* __restrict ap, const float* __restrict bp) {
  vf bv[NV];
#pragma GCC unroll 4
  for (int j = 0; j < NV; j++) bv[j] = vload(bp + j * VL);
#pragma GCC unroll 16
  for (int r = 0; r < ROWS; r++) {
    vf av = vbcast(ap[r]);
#pragma GCC unroll 4
    for (int j = 0; j < NV; j++) acc[r][j] = vfma(av, bv[j], acc[r][j]);
  }
}

// The micro-kernels' C update: C (op)= acc for ROWS x ncols (mode as for micro_kernel).
template <int ROWS>
__attribute__((always_inline)) inline void store_tile(vf (&acc)[ROWS][NV], float* c, int64_t ldc, int ncols, int mode,
                                                      const float* bias) {
  if (ncols == NR) {
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; r++) {
      float* cr = c + r * ldc;
#pragma GCC unroll 4
      for (int j = 0; j < NV; j++) {
        vf v = acc[r][j];
        if (mode == 2) v = vadd(v, vload(cr + j * VL));
        else if (mode == 1) v = vadd(v, vload(bias + j * VL));
        vstore(cr + j * VL, v);
      }
    }
  } else {
    alignas(64) float tile[ROWS][NR];
    for (int r = 0; r < ROWS; r++)
      for (int j = 0; j < NV; j++) vstore(&tile[r][j * VL], acc[r][j]);
    for (int r = 0; r < ROWS; r++) {
      float* cr = c + r * ldc;
      for (int j = 0; j < ncols; j++) {
        float v = tile[r][j];
        if (mode == 2) v += cr[j];
        else if (mode == 1) v += bias[j];
        cr[j] = v;
      }
    }
  }
}

template <int ROWS>
void micro_kernel(int64_t kc, const float* __restrict ap, const float* __restrict bp, float* c, int64_t ldc,
                  int ncols, int mode, const float* bias) {
  vf acc[ROWS][NV];
  zero_tile<ROWS>(acc, c, ldc);
#pragma GCC unroll 2
  for (int64_t k = 0; k < kc; k++, ap += MR, bp += NR) k_step<ROWS>(acc, ap, bp);
  store_tile<ROWS>(acc, c, ldc, ncols, mode, bias);
}

// A kernel specialised by row count, picked at run time: K::fn<R>() for R = 1..MR, in one static table.
template <class K, std::size_t... I>
constexpr std::array<typename K::Fn, sizeof...(I)> rows_table(std::index_sequence<I...>) {
  return {K::template fn<static_cast<int>(I) + 1>()...};
}
template <class K>
inline typename K::Fn for_rows(int rows) {
  static constexpr auto table = rows_table<K>(std::make_index_sequence<MR>{});
  return table[rows - 1];
}

using MicroFn = void (*)(int64_t, const float*, const float*, float*, int64_t, int, int, const float*);
struct MicroKernels {
  using Fn = MicroFn;
  template <int R>
  static constexpr Fn fn() { return &micro_kernel<R>; }
};
inline MicroFn micro_for_rows(int rows) { return for_rows<MicroKernels>(rows); }

// The full-height micro-kernel of the prepacked path: the same arithmetic as micro_kernel<MR> (every
// accumulator sums its k terms in the same order, so results are bit-identical), plus software
// prefetch of the panel the thread multiplies next: every 4 k steps, q lines from pf on (pf advances,
// up to pf_end). Spread over the sweep of A micro-panels, the next panel is in cache before it is used;
// the hardware prefetchers alone leave its first use waiting on memory.
template <int ROWS>
void micro_kernel_pf(int64_t kc, const float* __restrict ap, const float* __restrict bp, float* c, int64_t ldc,
                     int ncols, int mode, const float* bias, const char*& pf, const char* pf_end, int q) {
  vf acc[ROWS][NV];
  zero_tile<ROWS>(acc, c, ldc);
  auto step = [&]() __attribute__((always_inline)) {
    k_step<ROWS>(acc, ap, bp);
    ap += MR;
    bp += NR;
  };
  int64_t k = 0;
  for (; k + 4 <= kc; k += 4) {
    if (pf < pf_end) {
      for (int i = 0; i < q; i++) __builtin_prefetch(pf + 64 * i, 0, 3);
      pf += 64 * q;
    }
    step();
    step();
    step();
    step();
  }
  for (; k < kc; k++) step();
  store_tile<ROWS>(acc, c, ldc, ncols, mode, bias);
}


// ---- packing ----
// A block rows [0, mc) x k [0, kc) of a (element strides sa0, sa1) into MR-row panels:
// dst[panel][k][r], rows past mc zero-filled.
void pack_a(const float* a, int64_t sa0, int64_t sa1, int64_t mc, int64_t kc, float* dst) {
  for (int64_t i0 = 0; i0 < mc; i0 += MR) {
    int64_t mr = std::min<int64_t>(MR, mc - i0);
    float* d = dst + i0 * kc;
    for (int64_t r = 0; r < mr; r++) {
      const float* src = a + (i0 + r) * sa0;
      if (sa1 == 1) {
        for (int64_t k = 0; k < kc; k++) d[k * MR + r] = src[k];
      } else {
        for (int64_t k = 0; k < kc; k++) d[k * MR + r] = src[k * sa1];
      }
    }
    for (int64_t r = mr; r < MR; r++)
      for (int64_t k = 0; k < kc; k++) d[k * MR + r] = 0.0f;
  }
}

// B rows [0,kc) x cols [0,nc), row-major source (unit column stride, row stride ldb), into NR-column
// panels dst[panel][k][c], columns past nc zero-filled.
template <class L>
void pack_b_rowmajor(const typename L::T* b, int64_t ldb, int64_t kc, int64_t nc, float* dst) {
  for (int64_t j0 = 0; j0 < nc; j0 += NR) {
    int64_t nr = std::min<int64_t>(NR, nc - j0);
    float* d = dst + j0 * kc;
    if (nr == NR) {
      // The rows of a panel are ldb apart (12 KiB for GPT-2's c_fc): too far for the hardware
      // prefetchers to follow, so each row's lines were demand misses. Fetch the row kPackAhead rows on
      // while packing this one (M=128, N=3072, K=768 on 2 threads: ~2-3% faster, best of 6 A/B rounds).
      constexpr int64_t kPackAhead = 16;
      constexpr int64_t kRowBytes = NR * static_cast<int64_t>(sizeof(typename L::T));
      for (int64_t k = 0; k < kc; k++) {
        const typename L::T* s = b + k * ldb + j0;
        if (k + kPackAhead < kc) {
          const char* q = reinterpret_cast<const char*>(s + kPackAhead * ldb);
          for (int64_t o = 0; o < kRowBytes + 63; o += 64) __builtin_prefetch(q + o, 0, 3);
        }
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++) vstore(d + k * NR + j * VL, L::vec(s + j * VL));
      }
    } else {
      for (int64_t k = 0; k < kc; k++) {
        const typename L::T* s = b + k * ldb + j0;
        int64_t c = 0;
        for (; c < nr; c++) d[k * NR + c] = L::one(s + c);
        for (; c < NR; c++) d[k * NR + c] = 0.0f;
      }
    }
  }
}

#if defined(__AVX512F__)
// In-register transpose of a 16 x 16 float block: r[i] lane j  ->  r[j] lane i.
inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; i++) {  // 32-bit interleave inside 128-bit lanes
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; i++) {  // 64-bit interleave: u[4i+j] lane l = column 4l+j of rows 4i..4i+3
    __m512d t0 = _mm512_castps_pd(t[4 * i]), t1 = _mm512_castps_pd(t[4 * i + 1]);
    __m512d t2 = _mm512_castps_pd(t[4 * i + 2]), t3 = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  for (int j = 0; j < 4; j++) {  // 4 x 4 transpose of 128-bit lanes across u[j], u[4+j], u[8+j], u[12+j]
    __m512 v0 = _mm512_shuffle_f32x4(u[j], u[4 + j], _MM_SHUFFLE(1, 0, 1, 0));
    __m512 v1 = _mm512_shuffle_f32x4(u[j], u[4 + j], _MM_SHUFFLE(3, 2, 3, 2));
    __m512 v2 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], _MM_SHUFFLE(1, 0, 1, 0));
    __m512 v3 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], _MM_SHUFFLE(3, 2, 3, 2));
    r[j] = _mm512_shuffle_f32x4(v0, v2, _MM_SHUFFLE(2, 0, 2, 0));
    r[4 + j] = _mm512_shuffle_f32x4(v0, v2, _MM_SHUFFLE(3, 1, 3, 1));
    r[8 + j] = _mm512_shuffle_f32x4(v1, v3, _MM_SHUFFLE(2, 0, 2, 0));
    r[12 + j] = _mm512_shuffle_f32x4(v1, v3, _MM_SHUFFLE(3, 1, 3, 1));
  }
}

// Load n (<= 16) elements as 16 floats, zero-filling the rest.
template <class L>
inline __m512 load_partial(const typename L::T* p, int64_t n) {
  if (n == 16) return L::vec(p);
  alignas(64) typename L::T tmp[16] = {};
  for (int64_t i = 0; i < n; i++) tmp[i] = p[i];
  return L::vec(tmp);
}
#endif

// B rows [0,kc) x cols [0,nc) of a transposed source: b[k][n] = src[n * ldn + k] (the nn.Linear weight
// [N,K] read through .t()), into NR-column panels. With AVX-512, 16 x 16 blocks are transposed in
// registers; elsewhere a scalar loop that reads each W row sequentially.
template <class L>
void pack_b_trans(const typename L::T* b, int64_t ldn, int64_t kc, int64_t nc, float* dst) {
  for (int64_t j0 = 0; j0 < nc; j0 += NR) {
    int64_t nr = std::min<int64_t>(NR, nc - j0);
    float* d = dst + j0 * kc;
#if defined(__AVX512F__)
    for (int64_t c0 = 0; c0 < NR; c0 += 16) {
      int64_t ncol = std::max<int64_t>(0, std::min<int64_t>(16, nr - c0));
      int64_t k0 = 0;
      if (ncol == 16) {
        // Full blocks: 16 distinct, unrolled load instructions, each walking one W row by 64 B per
        // step, so the per-instruction stride prefetcher can follow every row (a rolled loop shares
        // one load instruction across 16 rows and measured ~3% slower overall at M=128).
        const typename L::T* s0 = b + (j0 + c0) * ldn;
        for (; k0 + 16 <= kc; k0 += 16) {
          __m512 r[16];
#pragma GCC unroll 16
          for (int i = 0; i < 16; i++) r[i] = L::vec(s0 + i * ldn + k0);
          transpose16(r);
#pragma GCC unroll 16
          for (int kk = 0; kk < 16; kk++) _mm512_store_ps(d + (k0 + kk) * NR + c0, r[kk]);
        }
      }
      for (; k0 < kc; k0 += 16) {
        int64_t nk = std::min<int64_t>(16, kc - k0);
        __m512 r[16];
        for (int64_t i = 0; i < 16; i++) {
          const typename L::T* s = b + (j0 + c0 + i) * ldn + k0;
          r[i] = i < ncol ? load_partial<L>(s, nk) : _mm512_setzero_ps();
        }
        transpose16(r);
        for (int64_t kk = 0; kk < nk; kk++) _mm512_store_ps(d + (k0 + kk) * NR + c0, r[kk]);
      }
    }
#else
    for (int64_t c = 0; c < NR; c++) {
      if (c < nr) {
        const typename L::T* s = b + (j0 + c) * ldn;
        for (int64_t k = 0; k < kc; k++) d[k * NR + c] = L::one(s + k);
      } else {
        for (int64_t k = 0; k < kc; k++) d[k * NR + c] = 0.0f;
      }
    }
#endif
  }
}

// Any strides, any dtype: correct, slow.
void pack_b_generic(const KView& b, int64_t k0, int64_t j0, int64_t kc, int64_t nc, float* dst) {
  for (int64_t p0 = 0; p0 < nc; p0 += NR) {
    float* d = dst + p0 * kc;
    for (int64_t k = 0; k < kc; k++)
      for (int64_t c = 0; c < NR; c++)
        d[k * NR + c] = p0 + c < nc
                            ? load_f32(b.data, b.dtype, (k0 + k) * b.stride(0) + (j0 + p0 + c) * b.stride(1))
                            : 0.0f;
  }
}

enum class BLayout { RowMajor, Trans, Generic };

BLayout classify_b(const KView& b) {
  const int64_t K = b.size(0), N = b.size(1);
  if (N == 1 && (b.stride(0) == 1 || K == 1)) return BLayout::Trans;  // a column vector: dot products
  if (b.stride(1) == 1 || N == 1) return BLayout::RowMajor;
  if (b.stride(0) == 1 || K == 1) return BLayout::Trans;
  return BLayout::Generic;
}

void pack_b(const KView& b, BLayout lay, int64_t k0, int64_t j0, int64_t kc, int64_t nc, float* dst) {
  if (lay == BLayout::RowMajor) {
    const int64_t ldb = b.stride(0);
    switch (b.dtype) {
      case DType::F32:
        return pack_b_rowmajor<LdF32>(b.ptr<const float>() + k0 * ldb + j0, ldb, kc, nc, dst);
      case DType::BF16:
        return pack_b_rowmajor<LdBF16>(b.ptr<const uint16_t>() + k0 * ldb + j0, ldb, kc, nc, dst);
      case DType::F16:
        return pack_b_rowmajor<LdF16>(b.ptr<const uint16_t>() + k0 * ldb + j0, ldb, kc, nc, dst);
      default: break;
    }
  } else if (lay == BLayout::Trans) {
    const int64_t ldn = b.stride(1);
    switch (b.dtype) {
      case DType::F32:
        return pack_b_trans<LdF32>(b.ptr<const float>() + j0 * ldn + k0, ldn, kc, nc, dst);
      case DType::BF16:
        return pack_b_trans<LdBF16>(b.ptr<const uint16_t>() + j0 * ldn + k0, ldn, kc, nc, dst);
      case DType::F16:
        return pack_b_trans<LdF16>(b.ptr<const uint16_t>() + j0 * ldn + k0, ldn, kc, nc, dst);
      default: break;
    }
  }
  pack_b_generic(b, k0, j0, kc, nc, dst);
}

// ---- GEMM path: one thread's block out[m0:m1, n0:n1] ----
struct GemmArgs {
  const float* a;
  int64_t sa0, sa1;
  const KView* b;
  BLayout lay;
  const float* bias;  // f32 [N] or nullptr
  float* c;
  int64_t ldc;
  int64_t M, N, K;
};

void gemm_block(const GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (m0 >= m1 || n0 >= n1) return;
  const int64_t K = g.K;
  const int64_t nkb = ceil_div(K, KC_MAX);
  const int64_t KC = ceil_div(ceil_div(K, nkb), 8) * 8;  // even split of K, multiple of 8
  const int64_t MC = std::min<int64_t>(MC_MAX, ceil_div(m1 - m0, MR) * MR);
  // With a single A block (the thread's rows fit in MC: prefill-sized M), every B micro-panel is used
  // by exactly one sweep over the A panels, so it is packed right before that sweep into a KC x NR
  // buffer that stays in L2, instead of packing the whole KC x NC block first (a round trip through
  // L3; ~4% slower at M=128, N=3072, K=768). Packing B still costs 12-16% of the time there (perf):
  // its reads wait on L3/DRAM, and software prefetch of the next panel measured no gain on this VM.
  const bool fused = m1 - m0 <= MC;
  const int64_t NC = fused ? n1 - n0 : std::min<int64_t>(NC_MAX, ceil_div(n1 - n0, NR) * NR);
  float* bp = t_bpack.get(static_cast<size_t>(KC * (fused ? kSlab * NR : NC)));
  float* ap = t_apack.get(static_cast<size_t>(KC * MC));
  for (int64_t jc = n0; jc < n1; jc += NC) {
    const int64_t nc = std::min(NC, n1 - jc);
    for (int64_t pc = 0; pc < K; pc += KC) {
      const int64_t kc = std::min(KC, K - pc);
      if (!fused) pack_b(*g.b, g.lay, pc, jc, kc, nc, bp);
      const int mode = pc > 0 ? 2 : (g.bias != nullptr ? 1 : 0);
      for (int64_t ic = m0; ic < m1; ic += MC) {
        const int64_t mc = std::min(MC, m1 - ic);
        pack_a(g.a + ic * g.sa0 + pc * g.sa1, g.sa0, g.sa1, mc, kc, ap);
        for (int64_t jr = 0; jr < nc; jr += NR) {
          const int ncols = static_cast<int>(std::min<int64_t>(NR, nc - jr));
          const float* bpanel = bp + jr * kc;
          if (fused) {
            const int64_t slab = jr % (kSlab * NR);
            if (slab == 0) pack_b(*g.b, g.lay, pc, jc + jr, kc, std::min(kSlab * NR, nc - jr), bp);
            bpanel = bp + slab * kc;
          }
          const float* bias = g.bias != nullptr ? g.bias + jc + jr : nullptr;
          for (int64_t ir = 0; ir < mc; ir += MR) {
            const int rows = static_cast<int>(std::min<int64_t>(MR, mc - ir));
            float* cblk = g.c + (ic + ir) * g.ldc + jc + jr;
            if (rows == MR)
              micro_kernel<MR>(kc, ap + ir * kc, bpanel, cblk, g.ldc, ncols, mode, bias);
            else
              micro_for_rows(rows)(kc, ap + ir * kc, bpanel, cblk, g.ldc, ncols, mode, bias);
          }
        }
      }
    }
  }
}

void gemm_path(const GemmArgs& g) {
  const int64_t Mp = ceil_div(g.M, MR), Np = ceil_div(g.N, NR);
  int T = num_threads();
  const double flops = 2.0 * g.M * g.N * g.K;
  if (flops < 2e6) T = 1;  // below ~10 us of work the fork/join costs more than it saves
  // Pick tm x tn = T minimising the per-thread cost: its tiles (compute) plus its packing traffic
  // (A rows + B columns it packs, each costing ~16 MACs-equivalent per k).
  int best_tm = 1;
  double best = 1e300;
  for (int tm = 1; tm <= T; tm++) {
    if (T % tm != 0) continue;
    const int tn = T / tm;
    const double rows = static_cast<double>(ceil_div(Mp, tm)) * MR, cols = static_cast<double>(ceil_div(Np, tn)) * NR;
    const double cost = rows * cols + 16.0 * (rows + cols);
    if (cost < best) { best = cost; best_tm = tm; }
  }
  const int tm = best_tm, tn = T / tm;
  auto run = [&](int64_t t) {
    const int64_t ti = t / tn, tj = t % tn;
    const int64_t m0 = std::min(g.M, Mp * ti / tm * MR), m1 = std::min(g.M, Mp * (ti + 1) / tm * MR);
    const int64_t n0 = std::min(g.N, Np * tj / tn * NR), n1 = std::min(g.N, Np * (tj + 1) / tn * NR);
    gemm_block(g, m0, m1, n0, n1);
  };
  if (T == 1) {
    run(0);
  } else {
    parallel_for(0, T, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; t++) run(t);
    });
  }
}

// ---- matrix-vector path (M <= kMatvecMaxM; grouped up to kStreamMaxM) ----
// Row-major b: acc[m, n0:n1] = sum_{k in [k0,k1)} a[m,k] * b[k, n0:n1]. Threads split K (each streams
// one contiguous block of rows: measured ~25% more bandwidth than splitting N, whose per-row chunks are
// short) and their partial sums are added at the end. RR rows of b are combined per pass over the
// accumulator strip (<= 256 KiB, L2-resident), so the strip costs one load + store per RR rows.
template <class L, int MM>
void axpy_rows(const float* a, int64_t lda, const typename L::T* b, int64_t ldb, int64_t k0, int64_t k1,
               int64_t n0, int64_t n1, float* acc, int64_t ldacc, bool zero_first) {
  // 8 rows of b per pass (8 streams in flight). For MM > 2 the MM * 8 broadcasts of a do not all fit in
  // registers and some become memory operands (L1 hits): still ~10% faster than 4 rows at M = 3, 4.
  constexpr int RR = 8;
  const int64_t strip = std::max<int64_t>(1024, 65536 / MM);
  if (zero_first)
    for (int m = 0; m < MM; m++)
      for (int64_t j = n0; j < n1; j++) acc[m * ldacc + j] = 0.0f;
  for (int64_t s0 = n0; s0 < n1; s0 += strip) {
    const int64_t s1 = std::min(n1, s0 + strip);
    const int64_t sv = s0 + (s1 - s0) / VL * VL;
    int64_t k = k0;
    for (; k + RR <= k1; k += RR) {
      const typename L::T* br = b + k * ldb;
      vf av[MM][RR];
#pragma GCC unroll 4
      for (int m = 0; m < MM; m++)
#pragma GCC unroll 8
        for (int q = 0; q < RR; q++) av[m][q] = vbcast(a[m * lda + k + q]);
      for (int64_t j = s0; j < sv; j += VL) {
        vf x[RR];
#pragma GCC unroll 8
        for (int q = 0; q < RR; q++) {
          x[q] = MM > 1 ? pin(L::vec(br + q * ldb + j)) : L::vec(br + q * ldb + j);
        }
#pragma GCC unroll 4
        for (int m = 0; m < MM; m++) {
          float* ar = acc + m * ldacc + j;
          vf s = vload(ar);
#pragma GCC unroll 8
          for (int q = 0; q < RR; q++) s = vfma(av[m][q], x[q], s);
          vstore(ar, s);
        }
      }
      for (int64_t j = sv; j < s1; j++)
        for (int m = 0; m < MM; m++) {
          float s = acc[m * ldacc + j];
          for (int q = 0; q < RR; q++) s += a[m * lda + k + q] * L::one(br + q * ldb + j);
          acc[m * ldacc + j] = s;
        }
    }
    for (; k < k1; k++) {
      const typename L::T* br = b + k * ldb;
      for (int m = 0; m < MM; m++) {
        const float am = a[m * lda + k];
        const vf avv = vbcast(am);
        float* ar = acc + m * ldacc;
        int64_t j = s0;
        for (; j < sv; j += VL) vstore(ar + j, vfma(avv, L::vec(br + j), vload(ar + j)));
        for (; j < s1; j++) ar[j] += am * L::one(br + j);
      }
    }
  }
}

// Transposed b (W [N,K], row n at w + n*ldn): RR dot products of length K per a row at once.
template <class L, int MM, int RR>
void dot_block(const float* a, int64_t lda, const typename L::T* w, int64_t ldn, int64_t K, float* c, int64_t ldc,
               const float* bias) {
  vf acc[MM][RR];
#pragma GCC unroll 4
  for (int m = 0; m < MM; m++)
#pragma GCC unroll 8
    for (int r = 0; r < RR; r++) acc[m][r] = vzero();
  const int64_t Kv = K / VL * VL;
  for (int64_t k = 0; k < Kv; k += VL) {
    // every operand is loaded once into a register: MM + RR loads per MM * RR FMAs
    vf x[RR], av[MM];
#pragma GCC unroll 8
    for (int r = 0; r < RR; r++) {
      x[r] = MM > 1 ? pin(L::vec(w + r * ldn + k)) : L::vec(w + r * ldn + k);
    }
#pragma GCC unroll 4
    for (int m = 0; m < MM; m++) {
      av[m] = RR > 1 ? pin(vload(a + m * lda + k)) : vload(a + m * lda + k);
    }
#pragma GCC unroll 4
    for (int m = 0; m < MM; m++)
#pragma GCC unroll 8
      for (int r = 0; r < RR; r++) acc[m][r] = vfma(av[m], x[r], acc[m][r]);
  }
  for (int m = 0; m < MM; m++) {
    for (int r = 0; r < RR; r++) {
      float s = vsum(acc[m][r]);
      for (int64_t k = Kv; k < K; k++) s += a[m * lda + k] * L::one(w + r * ldn + k);
      c[m * ldc + r] = s + (bias != nullptr ? bias[r] : 0.0f);
    }
  }
}

// One row at a time (M = 1, short rows): consecutive rows of W are adjacent in memory, so reading them
// one after another is a single sequential stream, which the hardware prefetchers follow best; four
// accumulators hide the FMA latency.
template <class L>
void dot_rows_seq(const float* a, const typename L::T* w, int64_t ldn, int64_t K, int64_t n0, int64_t n1, float* c,
                  const float* bias) {
  const int64_t K4 = K / (4 * VL) * (4 * VL), Kv = K / VL * VL;
  for (int64_t n = n0; n < n1; n++) {
    const typename L::T* r = w + n * ldn;
    vf s0 = vzero(), s1 = vzero(), s2 = vzero(), s3 = vzero();
    int64_t k = 0;
    for (; k < K4; k += 4 * VL) {
      s0 = vfma(vload(a + k), L::vec(r + k), s0);
      s1 = vfma(vload(a + k + VL), L::vec(r + k + VL), s1);
      s2 = vfma(vload(a + k + 2 * VL), L::vec(r + k + 2 * VL), s2);
      s3 = vfma(vload(a + k + 3 * VL), L::vec(r + k + 3 * VL), s3);
    }
    for (; k < Kv; k += VL) s0 = vfma(vload(a + k), L::vec(r + k), s0);
    float t = vsum(vadd(vadd(s0, s1), vadd(s2, s3)));
    for (; k < K; k++) t += a[k] * L::one(r + k);
    c[n] = t + (bias != nullptr ? bias[n] : 0.0f);
  }
}

template <class L, int MM>
void matvec_dots(const float* a, int64_t lda, const typename L::T* w, int64_t ldn, int64_t K, int64_t n0,
                 int64_t n1, float* c, int64_t ldc, const float* bias) {
  if (MM == 1 && ldn == K && K * static_cast<int64_t>(sizeof(typename L::T)) <= 8192) {
    dot_rows_seq<L>(a, w, ldn, K, n0, n1, c, bias);
    return;
  }
  // RR weight rows streamed at once (more streams = more lines in flight: 8 rows vs 4 is 28 vs 24 GB/s
  // at M = 1) within the 32 vector registers: MM*RR accumulators + RR rows + MM vectors of a. (Tried
  // for MM = 3, 4: 8 rows in L1-sized K chunks swept once per pair of a rows: slower, 14 vs 18 GB/s.)
  constexpr int RR = MM <= 2 ? 8 : (MM == 3 ? 6 : 5);
  int64_t n = n0;
  for (; n + RR <= n1; n += RR)
    dot_block<L, MM, RR>(a, lda, w + n * ldn, ldn, K, c + n, ldc, bias != nullptr ? bias + n : nullptr);
  for (; n < n1; n++)
    dot_block<L, MM, 1>(a, lda, w + n * ldn, ldn, K, c + n, ldc, bias != nullptr ? bias + n : nullptr);
}

void matvec_generic(const float* a, int64_t lda, const KView& b, int64_t K, int64_t MM, int64_t n0, int64_t n1,
                    float* c, int64_t ldc, const float* bias) {
  for (int64_t m = 0; m < MM; m++)
    for (int64_t n = n0; n < n1; n++) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; k++)
        s += a[m * lda + k] * load_f32(b.data, b.dtype, k * b.stride(0) + n * b.stride(1));
      c[m * ldc + n] = s + (bias != nullptr ? bias[n] : 0.0f);
    }
}

// One thread's share: W-rows (transposed b) or b-rows [k0,k1) x columns [n0,n1) (row-major b).
struct MvArgs {
  const float* a;
  int64_t lda;
  const KView* b;
  BLayout lay;
  int64_t M, K, N;
  float* c;  // out, row stride ldc (transposed / generic b write here directly, with bias)
  int64_t ldc;
  const float* bias;
  float* partial;  // row-major b: [ksplits][M][N] partial sums, added up by the caller
};

template <class L, int MM>
void matvec_part(const MvArgs& g, int64_t k0, int64_t k1, int64_t n0, int64_t n1, int64_t ks) {
  const auto* base = g.b->ptr<const typename L::T>();
  if (g.lay == BLayout::RowMajor)
    axpy_rows<L, MM>(g.a, g.lda, base, g.b->stride(0), k0, k1, n0, n1, g.partial + ks * MM * g.N, g.N, true);
  else
    matvec_dots<L, MM>(g.a, g.lda, base, g.b->stride(1), g.K, n0, n1, g.c, g.ldc, g.bias);
}

// kMatvecMaxM < M <= kStreamMaxM: the rows of a are taken in groups, and the weights are walked in
// chunks that stay in L2 while every group passes over them, so they still come from memory once.
// Row-major b: chunks of rows of b (~256 KiB), groups of 4 rows of a. Transposed b: blocks of 8 rows of
// W (8 x K), groups of 2 rows of a (the 8-row dot kernel).
template <class L>
void stream_part(const MvArgs& g, int64_t k0, int64_t k1, int64_t n0, int64_t n1, int64_t ks) {
  const auto* base = g.b->ptr<const typename L::T>();
  const int64_t M = g.M;
  if (g.lay == BLayout::RowMajor) {
    const int64_t ldb = g.b->stride(0);
    const int64_t row_bytes = (n1 - n0) * static_cast<int64_t>(sizeof(typename L::T));
    const int64_t chunk = std::max<int64_t>(8, (262144 / std::max<int64_t>(row_bytes, 1)) / 8 * 8);
    float* acc = g.partial + ks * M * g.N;
    for (int64_t c0 = k0; c0 < k1; c0 += chunk) {
      const int64_t c1 = std::min(k1, c0 + chunk);
      for (int64_t m = 0; m < M; m += 4) {
        const float* am = g.a + m * g.lda;
        float* accm = acc + m * g.N;
        const bool z = c0 == k0;
        switch (std::min<int64_t>(4, M - m)) {
          case 1: axpy_rows<L, 1>(am, g.lda, base, ldb, c0, c1, n0, n1, accm, g.N, z); break;
          case 2: axpy_rows<L, 2>(am, g.lda, base, ldb, c0, c1, n0, n1, accm, g.N, z); break;
          case 3: axpy_rows<L, 3>(am, g.lda, base, ldb, c0, c1, n0, n1, accm, g.N, z); break;
          default: axpy_rows<L, 4>(am, g.lda, base, ldb, c0, c1, n0, n1, accm, g.N, z); break;
        }
      }
    }
  } else {
    const int64_t ldn = g.b->stride(1);
    constexpr int RR = 8;
    for (int64_t n = n0; n < n1; n += RR) {
      const int64_t rr = std::min<int64_t>(RR, n1 - n);
      const float* bn = g.bias != nullptr ? g.bias + n : nullptr;
      for (int64_t m = 0; m < M; m += 2) {
        const float* am = g.a + m * g.lda;
        float* cm = g.c + m * g.ldc + n;
        if (rr == RR) {
          if (M - m >= 2)
            dot_block<L, 2, RR>(am, g.lda, base + n * ldn, ldn, g.K, cm, g.ldc, bn);
          else
            dot_block<L, 1, RR>(am, g.lda, base + n * ldn, ldn, g.K, cm, g.ldc, bn);
        } else {
          for (int64_t r = 0; r < rr; r++) {
            const float* br = bn != nullptr ? bn + r : nullptr;
            if (M - m >= 2)
              dot_block<L, 2, 1>(am, g.lda, base + (n + r) * ldn, ldn, g.K, cm + r, g.ldc, br);
            else
              dot_block<L, 1, 1>(am, g.lda, base + (n + r) * ldn, ldn, g.K, cm + r, g.ldc, br);
          }
        }
      }
    }
  }
}

template <class L>
void matvec_part_m(const MvArgs& g, int64_t k0, int64_t k1, int64_t n0, int64_t n1, int64_t ks) {
  static_assert(kMatvecMaxM == 4, "one instantiation per M below");
  switch (g.M) {
    case 1: return matvec_part<L, 1>(g, k0, k1, n0, n1, ks);
    case 2: return matvec_part<L, 2>(g, k0, k1, n0, n1, ks);
    case 3: return matvec_part<L, 3>(g, k0, k1, n0, n1, ks);
    case 4: return matvec_part<L, 4>(g, k0, k1, n0, n1, ks);
    default: return stream_part<L>(g, k0, k1, n0, n1, ks);
  }
}

thread_local Scratch t_partial;

void matvec_path(int64_t M, const float* a, int64_t lda, const KView& b, BLayout lay, int64_t K, int64_t N,
                 float* c, int64_t ldc, const float* bias) {
  MvArgs g{a, lda, &b, lay, M, K, N, c, ldc, bias, nullptr};
  const bool typed = b.dtype == DType::F32 || b.dtype == DType::BF16 || b.dtype == DType::F16;
  if (lay == BLayout::Generic || !typed) lay = g.lay = BLayout::Generic;
  auto part = [&](int64_t k0, int64_t k1, int64_t n0, int64_t n1, int64_t ks) {
    if (n0 >= n1) return;
    if (lay == BLayout::Generic) return matvec_generic(a, lda, b, K, M, n0, n1, c, ldc, bias);
    switch (b.dtype) {
      case DType::F32: return matvec_part_m<LdF32>(g, k0, k1, n0, n1, ks);
      case DType::BF16: return matvec_part_m<LdBF16>(g, k0, k1, n0, n1, ks);
      default: return matvec_part_m<LdF16>(g, k0, k1, n0, n1, ks);
    }
  };
  int T = num_threads();
  if (static_cast<double>(K) * N < 65536.0) T = 1;  // < ~64K weights: a fork/join costs more
  // Row-major b with enough rows: split K (contiguous row blocks); otherwise split N in chunks
  // aligned to 64 columns (whole cache lines for every dtype).
  const bool ksplit = lay == BLayout::RowMajor && T > 1 && K >= 64 * T;
  const int64_t nks = ksplit ? T : 1;
  if (lay == BLayout::RowMajor) g.partial = t_partial.get(static_cast<size_t>(nks * M * N));
  const int64_t units = ceil_div(N, 64);
  if (!ksplit && T > units) T = static_cast<int>(units);
  if (T <= 1) {
    part(0, K, 0, N, 0);
  } else {
    parallel_for(0, T, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; t++) {
        if (ksplit)
          part(K * t / T, K * (t + 1) / T, 0, N, t);
        else
          part(0, K, std::min(N, units * t / T * 64), std::min(N, units * (t + 1) / T * 64), 0);
      }
    });
  }
  if (lay == BLayout::RowMajor) {  // c = sum of the K-split partials + bias
    for (int64_t m = 0; m < M; m++) {
      float* cr = c + m * ldc;
      for (int64_t j = 0; j < N; j++) {
        float s = bias != nullptr ? bias[j] : 0.0f;
        for (int64_t ks = 0; ks < nks; ks++) s += g.partial[(ks * M + m) * N + j];
        cr[j] = s;
      }
    }
  }
}

// ---- prepacked B (gemm.h: pack_weight / gemm_packed) ----
// Streaming kernel (M <= MR rows): NP consecutive panels at once, so NP streams of weights are in flight
// (one stream per core leaves DRAM bandwidth unused). Full panels only (ncols == NR). Each output
// element is summed exactly as micro_kernel sums it (its k terms in order into one accumulator lane,
// then the bias or the previous K blocks added once), so the results are the same bits.
template <int ROWS, int NP>
void stream_kernel(int64_t kc, const float* __restrict ap, const float* __restrict bp, int64_t panel_stride, float* c,
                   int64_t ldc, int mode, const float* bias) {
  vf acc[ROWS][NP][NV];
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; r++)
#pragma GCC unroll 4
    for (int i = 0; i < NP; i++)
#pragma GCC unroll 4
      for (int j = 0; j < NV; j++) acc[r][i][j] = vzero();
  for (int64_t k = 0; k < kc; k++) {
    vf bv[NP][NV];
#pragma GCC unroll 4
    for (int i = 0; i < NP; i++)
#pragma GCC unroll 4
      for (int j = 0; j < NV; j++) bv[i][j] = ROWS > 1 ? pin(vload(bp + i * panel_stride + j * VL)) : vload(bp + i * panel_stride + j * VL);
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; r++) {
      const vf av = vbcast(ap[r]);
#pragma GCC unroll 4
      for (int i = 0; i < NP; i++)
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++) acc[r][i][j] = vfma(av, bv[i][j], acc[r][i][j]);
    }
    ap += MR;
    bp += NR;
  }
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; r++)
#pragma GCC unroll 4
    for (int i = 0; i < NP; i++) {
      float* cr = c + r * ldc + i * NR;
#pragma GCC unroll 4
      for (int j = 0; j < NV; j++) {
        vf v = acc[r][i][j];
        if (mode == 2) v = vadd(v, vload(cr + j * VL));
        else if (mode == 1) v = vadd(v, vload(bias + i * NR + j * VL));
        vstore(cr + j * VL, v);
      }
    }
}

using StreamFn = void (*)(int64_t, const float*, const float*, int64_t, float*, int64_t, int, const float*);
// panels per pass by rows: 4 while the accumulators (ROWS * NP * NV) and loads fit the registers
constexpr int stream_np(int rows) { return NV * VL >= 32 ? (rows <= 2 ? 4 : rows <= 4 ? 2 : 1) : (rows <= 2 ? 2 : 1); }
struct StreamKernels {
  using Fn = StreamFn;
  template <int R>
  static constexpr Fn fn() { return &stream_kernel<R, stream_np(R)>; }
};
inline StreamFn stream_for_rows(int rows) { return for_rows<StreamKernels>(rows); }

// Blocking of K as in gemm_block (an even split in blocks of <= KC_MAX, multiples of 8): it depends on
// K alone, so every M sums the same blocks in the same order.

inline int64_t k_block(int64_t K) {
  const int64_t nkb = ceil_div(K, KC_MAX);
  return ceil_div(ceil_div(K, nkb), 8) * 8;
}

struct PackedArgs {
  const float* a;
  int64_t sa0, sa1;
  const float* packed;
  const float* bias;  // f32 [N] or nullptr
  Epilogue act;
  const float* res;   // f32 rows of the residual (row stride ldr, unit column stride) or nullptr
  int64_t ldr;
  float* c;
  int64_t ldc;
  int64_t M, N, K;
};

// The finished tile out[i0:i0+rows, j0:j0+ncols] (c points at its first element): the activation, then
// the residual added (out = res + act(..), one f32 add per element: the same bits as a separate add op).
void apply_epilogue(const PackedArgs& g, float* c, int64_t i0, int64_t j0, int64_t rows, int64_t ncols) {
  if (g.act != Epilogue::NONE) {
    const UnaryOp op = g.act == Epilogue::GELU_TANH ? UnaryOp::GELU_TANH : UnaryOp::GELU_ERF;
    for (int64_t r = 0; r < rows; r++) fast::unary_f32(op, c + r * g.ldc, c + r * g.ldc, ncols);
  }
  if (g.res != nullptr) {
    for (int64_t r = 0; r < rows; r++) {
      float* cr = c + r * g.ldc;
      const float* rr = g.res + (i0 + r) * g.ldr + j0;
      int64_t j = 0;
      for (; j + VL <= ncols; j += VL) vstore(cr + j, vadd(vload(rr + j), vload(cr + j)));
      for (; j < ncols; j++) cr[j] = rr[j] + cr[j];
    }
  }
}

// Work is handed out dynamically: the output is cut into units (a run of panels x a block of rows) that
// the threads claim from a shared counter, several per thread, so a thread that loses its core to
// another process (a shared machine) leaves its remaining units to the others instead of holding the
// whole product back. With a static half each, one busy core made every GEMM take ~2x as long; measured
// on the GPT-2 prefill, such runs took 360 ms instead of 160 ms at 1 x 128.
struct Units {
  int64_t rows_per = 0, panels_per = 0, nrb = 0, npc = 0;  // unit u: row block u % nrb, panel run u / nrb
  int64_t count() const { return nrb * npc; }
};

Units make_units(int64_t M, int64_t P, int T, int64_t panel_align) {
  Units u;
  const int64_t want = T > 1 ? 4 * T : 1;  // units to aim for
  // all rows in one block when the panels alone give enough units (A is shared: no reason to split M)
  u.rows_per = ceil_div(M, MR) * MR;
  if (P < want && M > MR) u.rows_per = std::max<int64_t>(MR, ceil_div(ceil_div(M, ceil_div(want, P)), MR) * MR);
  u.nrb = ceil_div(M, u.rows_per);
  const int64_t runs = std::max<int64_t>(1, want / u.nrb);
  u.panels_per = std::max<int64_t>(1, ceil_div(ceil_div(P, runs), panel_align) * panel_align);
  u.npc = ceil_div(P, u.panels_per);
  return u;
}

// Runs fn(p0, p1) over runs of panels covering [0, P), claimed by the pool's threads from a shared
// counter with guided sizes: a claim takes ~1/(2T) of what is left (rounded up to `align` panels while
// that many are left), so the claims shrink towards the end and the threads finish within about one
// panel of each other (fixed-size units left up to a whole unit of imbalance: 12% on Llama's 43-panel
// MLP projections in decode).
template <class Fn>
void for_panel_runs(int64_t P, int T, int64_t align, Fn&& fn) {
  if (T <= 1 || P <= 1) {
    if (P > 0) fn(int64_t{0}, P);
    return;
  }
  std::atomic<int64_t> next{0};
  parallel_for(0, T, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; t++)
      for (;;) {
        int64_t cur = next.load(std::memory_order_relaxed), take;
        do {
          const int64_t rem = P - cur;
          if (rem <= 0) return;
          take = ceil_div(rem, 2 * static_cast<int64_t>(T));
          take = rem >= align ? std::min(rem, ceil_div(take, align) * align) : rem;
        } while (!next.compare_exchange_weak(cur, cur + take, std::memory_order_relaxed));
        fn(cur, cur + take);
      }
  });
}

// Runs fn(unit) for every unit, claimed dynamically by the pool's threads (all of them on one thread
// when T == 1).
template <class Fn>
void for_units(int64_t count, int T, Fn&& fn) {
  if (T <= 1 || count <= 1) {
    for (int64_t u = 0; u < count; u++) fn(u);
    return;
  }
  std::atomic<int64_t> next{0};
  parallel_for(0, T, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; t++)
      for (int64_t u = next.fetch_add(1, std::memory_order_relaxed); u < count; u = next.fetch_add(1, std::memory_order_relaxed)) fn(u);
  });
}

// Streaming (decode-sized M <= MR): a packed once for all of K (one MR-row panel, [k][MR]) by the
// caller; each weight panel is then read once, front to back, K block after K block, by whichever
// thread claims its run.
void packed_stream(const PackedArgs& g, int T) {
  const int64_t K = g.K, KC = k_block(K), P = ceil_div(g.N, NR);
  float* ap = t_apack.get(static_cast<size_t>(K * MR));
  pack_a(g.a, g.sa0, g.sa1, g.M, K, ap);
  const int rows = static_cast<int>(g.M);
  const int np = stream_np(rows);
  const StreamFn sfn = stream_for_rows(rows);
  const MicroFn fn = micro_for_rows(rows);
  float* c = g.c;
  for_panel_runs(P, T, np, [&](int64_t p0, int64_t p1) {
    for (int64_t j = p0; j < p1;) {
      const float* panel = g.packed + j * K * NR;
      const float* bias = g.bias != nullptr ? g.bias + j * NR : nullptr;
      const int64_t cols_left = g.N - j * NR;
      if (j + np <= p1 && cols_left >= np * NR) {  // np full panels at once
        for (int64_t pc = 0; pc < K; pc += KC) {
          const int64_t kc = std::min(KC, K - pc);
          sfn(kc, ap + pc * MR, panel + pc * NR, K * NR, c + j * NR, g.ldc, pc > 0 ? 2 : (bias != nullptr ? 1 : 0), bias);
        }
        apply_epilogue(g, c + j * NR, 0, j * NR, g.M, np * NR);
        j += np;
        continue;
      }
      const int ncols = static_cast<int>(std::min<int64_t>(NR, cols_left));
      for (int64_t pc = 0; pc < K; pc += KC) {
        const int64_t kc = std::min(KC, K - pc);
        fn(kc, ap + pc * MR, panel + pc * NR, c + j * NR, g.ldc, ncols, pc > 0 ? 2 : (bias != nullptr ? 1 : 0), bias);
      }
      apply_epilogue(g, c + j * NR, 0, j * NR, g.M, ncols);
      j++;
    }
  });
}

// GEMM (M > MR), per K block: the rows of a are packed once into a shared buffer (the threads split
// the row panels), then the units sweep them: each panel of a unit's run passes over the unit's rows
// (the panel stays in L2 across the sweep, the A micro-panels come from L2/L3) while the next panel of
// the run is prefetched. The K blocks run one after another (a block adds into what the previous one
// wrote), so every element is summed in the same order whichever thread computes it.
thread_local Scratch t_ashared;
void packed_gemm_path(const PackedArgs& g, int T) {
  const int64_t K = g.K, KC = k_block(K), P = ceil_div(g.N, NR), Mp = ceil_div(g.M, MR);
  const Units un = make_units(g.M, P, T, 1);
  float* ap = t_ashared.get(static_cast<size_t>(KC * Mp * MR));
  for (int64_t pc = 0; pc < K; pc += KC) {
    const int64_t kc = std::min(KC, K - pc);
    const bool last = pc + kc >= K;
    // pack: row panel i (MR rows) at ap + i * MR * kc, as pack_a lays out consecutive panels
    const int64_t pgrain = std::max<int64_t>(1, ceil_div(Mp, 2 * std::max(T, 1)));
    auto pack_rows = [&](int64_t lo, int64_t hi) {
      const int64_t r0 = lo * MR, r1 = std::min(g.M, hi * MR);
      pack_a(g.a + r0 * g.sa0 + pc * g.sa1, g.sa0, g.sa1, r1 - r0, kc, ap + r0 * kc);
    };
    if (T > 1 && Mp > 1) parallel_for(0, Mp, pgrain, pack_rows);
    else pack_rows(0, Mp);
    // prefetch: the next panel's K block over this unit's sweep, q lines per 4 k steps of the full tiles
    const int64_t lines = kc * NR * static_cast<int64_t>(sizeof(float)) / 64;
    const int64_t steps = std::max<int64_t>(1, (std::min(un.rows_per, g.M) / MR) * (kc / 4));
    const int q = static_cast<int>(std::min<int64_t>(8, ceil_div(lines, steps)));
    auto sweep = [&](int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
      for (int64_t j = p0; j < p1; j++) {
        const float* panel = g.packed + j * K * NR + pc * NR;
        const float* next = j + 1 < p1 ? panel + K * NR : nullptr;
        const char* pf = reinterpret_cast<const char*>(next);
        const char* pf_end = next != nullptr ? pf + lines * 64 : pf;
        const int ncols = static_cast<int>(std::min<int64_t>(NR, g.N - j * NR));
        const float* bias = g.bias != nullptr ? g.bias + j * NR : nullptr;
        const int mode = pc > 0 ? 2 : (bias != nullptr ? 1 : 0);
        for (int64_t ir = m0; ir < m1; ir += MR) {
          const int rows = static_cast<int>(std::min<int64_t>(MR, m1 - ir));
          float* cblk = g.c + ir * g.ldc + j * NR;
          const float* apan = ap + ir * kc;
          if (rows == MR)
            micro_kernel_pf<MR>(kc, apan, panel, cblk, g.ldc, ncols, mode, bias, pf, pf_end, q);
          else
            micro_for_rows(rows)(kc, apan, panel, cblk, g.ldc, ncols, mode, bias);
          if (last) apply_epilogue(g, cblk, ir, j * NR, rows, ncols);
        }
      }
    };
    if (un.nrb == 1) {  // enough panels: guided runs of panels over all the rows
      for_panel_runs(P, T, 1, [&](int64_t p0, int64_t p1) { sweep(0, g.M, p0, p1); });
    } else {  // few panels, many rows: units of (row block, panel run)
      for_units(un.count(), T, [&](int64_t u) {
        const int64_t m0 = (u % un.nrb) * un.rows_per;
        const int64_t p0 = (u / un.nrb) * un.panels_per;
        sweep(m0, std::min(g.M, m0 + un.rows_per), p0, std::min(P, p0 + un.panels_per));
      });
    }
  }
}

void packed_path(const PackedArgs& g) {
  int T = num_threads();
  // below ~10 us of work (GEMM) or 64K weights (streaming) a fork/join costs more than it saves
  if (g.M <= MR ? g.K * g.N < 65536 : 2.0 * g.M * g.N * g.K < 2e6) T = 1;
  if (g.M <= MR) packed_stream(g, T);
  else packed_gemm_path(g, T);
}

// bias [N] as dense f32: in place when it already is, else converted into buf (nullptr without a bias).
const float* dense_bias(const KView* bias, int64_t N, std::vector<float>& buf) {
  if (bias == nullptr) return nullptr;
  if (bias->dtype == DType::F32 && (bias->stride(0) == 1 || N == 1)) return bias->ptr<const float>();
  buf.resize(static_cast<size_t>(N));
  for (int64_t j = 0; j < N; j++) buf[j] = load_f32(bias->data, bias->dtype, j * bias->stride(0));
  return buf.data();
}

// Where a product is written: out itself when its rows are dense f32, else a dense scratch that finish()
// copies into out.
struct OutRows {
  const KView& out;
  int64_t M, N;
  std::vector<float> buf;
  float* c;
  int64_t ldc;
  OutRows(const KView& o, int64_t m, int64_t n) : out(o), M(m), N(n) {
    if (out.dtype == DType::F32 && (out.stride(1) == 1 || N == 1)) {
      c = out.ptr<float>();
      ldc = out.stride(0);
    } else {
      buf.resize(static_cast<size_t>(M * N));
      c = buf.data();
      ldc = N;
    }
  }
  void finish() {
    if (buf.empty()) return;
    for (int64_t i = 0; i < M; i++)
      for (int64_t j = 0; j < N; j++) store_f32(out.data, out.dtype, i * out.stride(0) + j * out.stride(1), c[i * N + j]);
  }
};

}  // namespace

namespace fast {
void gemm(const KView& a, const KView& b, const KView* bias, const KView& out) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if (M == 0 || N == 0) return;

  // bias -> dense f32
  std::vector<float> bias_buf;
  const float* biasf = dense_bias(bias, N, bias_buf);

  // out: written in place when its rows are dense f32, else through a dense scratch
  OutRows dst(out, M, N);
  float* c = dst.c;
  const int64_t ldc = dst.ldc;

  if (K == 0) {
    for (int64_t i = 0; i < M; i++)
      for (int64_t j = 0; j < N; j++) c[i * ldc + j] = biasf != nullptr ? biasf[j] : 0.0f;
  } else {
    const BLayout lay = classify_b(b);
    // a: used in place when f32 (the GEMM packing handles any strides; matvec wants unit k-stride)
    std::vector<float> a_buf;
    const float* ap = a.ptr<const float>();
    int64_t sa0 = a.stride(0), sa1 = a.stride(1);
    const bool small_m = M <= kStreamMaxM;
    if (a.dtype != DType::F32 || (small_m && sa1 != 1 && K > 1)) {
      a_buf.resize(static_cast<size_t>(M * K));
      for (int64_t i = 0; i < M; i++)
        for (int64_t k = 0; k < K; k++) a_buf[i * K + k] = load_f32(a.data, a.dtype, i * sa0 + k * sa1);
      ap = a_buf.data();
      sa0 = K;
      sa1 = 1;
    }
    if (small_m) {
      matvec_path(M, ap, sa0, b, lay, K, N, c, ldc, biasf);
    } else {
      GemmArgs g{ap, sa0, sa1, &b, lay, biasf, c, ldc, M, N, K};
      gemm_path(g);
    }
  }

  dst.finish();
}

void pack_weight(const KView& b, float* dst) {
  const int64_t K = b.size(0), N = b.size(1), P = ceil_div(N, NR);
  if (P == 0) return;
  if (K == 0) return;
  const BLayout lay = classify_b(b);
  const int T = static_cast<double>(K) * N < 65536.0 ? 1 : num_threads();
  parallel_for(0, P, std::max<int64_t>(1, ceil_div(P, 8 * T)), [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; j++) pack_b(b, lay, 0, j * NR, K, std::min<int64_t>(NR, N - j * NR), dst + j * K * NR);
  });
}

void gemm_packed(const KView& a, const float* packed, int64_t N, const KView* bias, const KView* residual, Epilogue act,
                 const KView& out) {
  const int64_t M = a.size(0), K = a.size(1);
  if (M == 0 || N == 0) return;
  std::vector<float> res_buf;
  const float* resf = nullptr;
  int64_t ldr = N;
  if (residual != nullptr) {
    if (residual->dtype == DType::F32 && (residual->stride(1) == 1 || N == 1)) {
      resf = residual->ptr<const float>();
      ldr = residual->stride(0);
    } else {
      res_buf.resize(static_cast<size_t>(M * N));
      for (int64_t i = 0; i < M; i++)
        for (int64_t j = 0; j < N; j++)
          res_buf[i * N + j] = load_f32(residual->data, residual->dtype, i * residual->stride(0) + j * residual->stride(1));
      resf = res_buf.data();
    }
  }
  std::vector<float> bias_buf;
  const float* biasf = dense_bias(bias, N, bias_buf);
  OutRows dst(out, M, N);
  float* c = dst.c;
  const int64_t ldc = dst.ldc;
  PackedArgs g{nullptr, 0, 0, packed, biasf, act, resf, ldr, c, ldc, M, N, K};
  if (K == 0) {
    for (int64_t i = 0; i < M; i++) {
      for (int64_t j = 0; j < N; j++) c[i * ldc + j] = biasf != nullptr ? biasf[j] : 0.0f;
      apply_epilogue(g, c + i * ldc, i, 0, 1, N);
    }
  } else {
    std::vector<float> a_buf;
    const float* ap = a.ptr<const float>();
    int64_t sa0 = a.stride(0), sa1 = a.stride(1);
    if (a.dtype != DType::F32) {
      a_buf.resize(static_cast<size_t>(M * K));
      for (int64_t i = 0; i < M; i++)
        for (int64_t k = 0; k < K; k++) a_buf[i * K + k] = load_f32(a.data, a.dtype, i * sa0 + k * sa1);
      ap = a_buf.data();
      sa0 = K;
      sa1 = 1;
    }
    g.a = ap;
    g.sa0 = sa0;
    g.sa1 = sa1;
    packed_path(g);
  }
  dst.finish();
}
}  // namespace fast

int64_t packed_width() { return NR; }
int64_t packed_numel(int64_t K, int64_t N) { return ceil_div(N, NR) * NR * K; }

void packed_columns(const float* packed, int64_t K, int64_t N, const KView& ids, const KView& out) {
  const size_t n = static_cast<size_t>(ids.numel());
  std::vector<int64_t> id(n), off(n);  // per lookup: the id, and where its row of out starts
  for_each_index(ids.ndim, ids.shape, [&](int64_t lin, const int64_t* idx) {
    const int64_t v = load_i64(ids.data, ids.dtype, ids.offset_of(idx));
    if (v < 0 || v >= N)
      throw Error("INDEX", "embedding: id " + std::to_string(v) + " out of range [0, " + std::to_string(N) + ")");
    int64_t oo = 0;
    for (int i = 0; i < ids.ndim; i++) oo += idx[i] * out.strides[i];
    id[static_cast<size_t>(lin)] = v;
    off[static_cast<size_t>(lin)] = oo;
  });
  const int64_t sk = out.strides[out.ndim - 1];
  // a column is K loads NR floats apart (a cache line each): spread the lookups over the threads
  parallel_for(0, static_cast<int64_t>(n), std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; i++) {
      const int64_t v = id[static_cast<size_t>(i)], oo = off[static_cast<size_t>(i)];
      const float* col = packed + (v / NR) * K * NR + v % NR;  // stride NR down the column
      if (out.dtype == DType::F32) {
        float* o = out.ptr<float>() + oo;
        for (int64_t k = 0; k < K; k++) o[k * sk] = col[k * NR];
      } else {
        for (int64_t k = 0; k < K; k++) store_f32(out.data, out.dtype, oo + k * sk, col[k * NR]);
      }
    }
  });
}

namespace ref {
void pack_weight(const KView& b, float* dst) {
  const int64_t K = b.size(0), N = b.size(1), P = ceil_div(N, NR);
  for (int64_t j = 0; j < P; j++)
    for (int64_t k = 0; k < K; k++)
      for (int64_t c = 0; c < NR; c++) {
        const int64_t n = j * NR + c;
        dst[(j * K + k) * NR + c] = n < N ? load_f32(b.data, b.dtype, k * b.stride(0) + n * b.stride(1)) : 0.0f;
      }
}

void gemm_packed(const KView& a, const float* packed, int64_t N, const KView* bias, const KView* residual, Epilogue act,
                 const KView& out) {
  const int64_t M = a.size(0), K = a.size(1);
  for (int64_t i = 0; i < M; i++)
    for (int64_t n = 0; n < N; n++) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; k++)
        acc += load_f32(a.data, a.dtype, i * a.stride(0) + k * a.stride(1)) * packed[((n / NR) * K + k) * NR + n % NR];
      if (bias != nullptr) acc += load_f32(bias->data, bias->dtype, n * bias->stride(0));
      store_f32(out.data, out.dtype, i * out.stride(0) + n * out.stride(1), acc);
    }
  if (act != Epilogue::NONE) ref::unary(act == Epilogue::GELU_TANH ? UnaryOp::GELU_TANH : UnaryOp::GELU_ERF, out, out);
  if (residual != nullptr) ref::binary(BinaryOp::ADD, *residual, out, out);
}
}  // namespace ref

}  // namespace nx
