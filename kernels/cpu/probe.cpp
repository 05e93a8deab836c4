// probe.cpp: FMA-peak and STREAM-triad probes (see probe.h). Used by bench/cpp/*_bench.cpp to report
// results as a fraction of the machine's measured limits.
//
// FMA peak: every thread runs a loop of independent FMA chains acc_i = acc_i * x + y. Enough chains
// (16 zmm / 16 ymm) cover the FMA latency (4 cycles on Zen4/Skylake) times the issue rate (one zmm or
// two ymm per cycle), so the loop is bound by FMA throughput alone. x and y keep the values bounded.
//
// Triad: a[i] = b[i] + s*c[i] over float arrays; each thread owns a contiguous slice that it also
// first-touches (page placement follows the thread that uses it).
//
// Bench: called from `bench/cpp/gemm_bench.cpp` (prints both at 1 and 2 threads).
#include "probe.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <thread>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace nx {
namespace {

using Clock = std::chrono::steady_clock;

// Runs fn(tid) on `threads` threads released together; returns seconds from release to last finish.
double run_together(int threads, const std::function<void(int)>& fn) {
  if (threads < 1) threads = 1;
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<Clock::time_point> ends(static_cast<size_t>(threads));
  Clock::time_point start;
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; t++) {
    ts.emplace_back([&, t] {
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) {
      }
      fn(t);
      ends[static_cast<size_t>(t)] = Clock::now();
    });
  }
  while (ready.load() != threads) std::this_thread::yield();
  start = Clock::now();
  go.store(true, std::memory_order_release);
  for (auto& th : ts) th.join();
  auto last = *std::max_element(ends.begin(), ends.end());
  return std::chrono::duration<double>(last - start).count();
}

// One thread's FMA loop; returns a value derived from the accumulators so nothing is dead code.
float fma_loop(int isa, int64_t iters) {
#if defined(__AVX512F__)
  if (isa == 512) {
    __m512 x = _mm512_set1_ps(0.999999f), y = _mm512_set1_ps(1e-6f);
    __m512 c[16];
    for (int i = 0; i < 16; i++) c[i] = _mm512_set1_ps(static_cast<float>(i));
    for (int64_t it = 0; it < iters; it++) {
      for (int i = 0; i < 16; i++) c[i] = _mm512_fmadd_ps(c[i], x, y);
    }
    __m512 s = c[0];
    for (int i = 1; i < 16; i++) s = _mm512_add_ps(s, c[i]);
    return _mm512_reduce_add_ps(s);
  }
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if (isa == 256) {
    __m256 x = _mm256_set1_ps(0.999999f), y = _mm256_set1_ps(1e-6f);
    __m256 c[16];
    for (int i = 0; i < 16; i++) c[i] = _mm256_set1_ps(static_cast<float>(i));
    for (int64_t it = 0; it < iters; it++) {
      for (int i = 0; i < 16; i++) c[i] = _mm256_fmadd_ps(c[i], x, y);
    }
    __m256 s = c[0];
    for (int i = 1; i < 16; i++) s = _mm256_add_ps(s, c[i]);
    float out[8];
    _mm256_storeu_ps(out, s);
    return out[0] + out[7];
  }
#endif
  if (isa == 0) {
    float c[16];
    for (int i = 0; i < 16; i++) c[i] = static_cast<float>(i);
    for (int64_t it = 0; it < iters; it++) {
      for (int i = 0; i < 16; i++) c[i] = std::fma(c[i], 0.999999f, 1e-6f);
    }
    float s = 0;
    for (int i = 0; i < 16; i++) s += c[i];
    return s;
  }
  return 0.0f;
}

int lanes_for(int isa) {
#if defined(__AVX512F__)
  if (isa == 512) return 16;
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if (isa == 256) return 8;
#endif
  if (isa == 0) return 1;
  return 0;
}

volatile float g_sink;

}  // namespace

double probe_fma_peak_gflops(int threads, int isa) {
  int lanes = lanes_for(isa);
  if (lanes == 0) return 0.0;
  if (threads < 1) threads = 1;
  // ~40 ms per rep at ~100 GFLOP/s per core for the vector cases; many short reps so that the best
  // one is likely to have had every core to itself on a shared machine
  const int64_t iters = lanes >= 8 ? 8000000 / (lanes / 8) : 800000;
  double best = 0;
  for (int rep = 0; rep < 12; rep++) {
    std::vector<float> sinks(static_cast<size_t>(threads));
    double s = run_together(threads, [&](int t) { sinks[static_cast<size_t>(t)] = fma_loop(isa, iters); });
    for (float v : sinks) g_sink = v;
    double flops = 2.0 * 16 * lanes * static_cast<double>(iters) * threads;
    best = std::max(best, flops / s / 1e9);
  }
  return best;
}

double probe_triad_gbps(int threads, size_t bytes_per_array) {
  if (threads < 1) threads = 1;
  size_t n = bytes_per_array / sizeof(float);
  if (n == 0) return 0.0;
  // raw allocations so that the first touch happens in the owning thread, not in a constructor
  float* a = static_cast<float*>(std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64));
  float* b = static_cast<float*>(std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64));
  float* c = static_cast<float*>(std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64));
  auto slice = [&](int t, size_t& lo, size_t& hi) {
    lo = n * static_cast<size_t>(t) / static_cast<size_t>(threads);
    hi = n * static_cast<size_t>(t + 1) / static_cast<size_t>(threads);
  };
  run_together(threads, [&](int t) {
    size_t lo, hi;
    slice(t, lo, hi);
    for (size_t i = lo; i < hi; i++) { a[i] = 0.0f; b[i] = 1.0f; c[i] = 2.0f; }
  });
  const float s = 3.0f;
  double best = 0;
  for (int rep = 0; rep < 12; rep++) {
    double sec = run_together(threads, [&](int t) {
      size_t lo, hi;
      slice(t, lo, hi);
      float* __restrict pa = a;
      const float* __restrict pb = b;
      const float* __restrict pc = c;
      for (size_t i = lo; i < hi; i++) pa[i] = pb[i] + s * pc[i];
    });
    best = std::max(best, 3.0 * static_cast<double>(n * sizeof(float)) / sec / 1e9);
  }
  g_sink = a[n / 2];
  std::free(a);
  std::free(b);
  std::free(c);
  return best;
}

}  // namespace nx
