// gemm_bench.cpp: nx::fast::gemm throughput, side by side with OpenBLAS sgemm and the machine probes.
//
// Prints ONE JSON line per result (all at the end, once every pass and probe has run):
//   {"bench":"probe",...}                        FMA peak (AVX-512 and AVX2) and STREAM triad, 1 and 2 threads
//   {"bench":"gemm","impl":"nx",...,"ms","gflops","frac_fma_peak"}        GEMM, per b dtype / layout / threads
//   {"bench":"gemm","impl":"openblas",...,"speedup_nx"}                   same f32 shape through cblas_sgemm
//   {"bench":"gemm","impl":"nx","kind":"matvec",...,"gbps","frac_triad"}  M = 1 decode, weights > L3
// "ms" is the best of all timed repetitions, over several passes through all configurations (the
// machine is shared and noisy: best-of is the estimate of what the code can do; "ms_median" is the
// lowest per-round median, printed beside it). gflops = 2*M*N*K / time. frac_fma_peak
// divides by the probe's AVX-512 FMA peak at the same thread count; gbps counts the weight bytes read
// once per call (a and out are < 0.1% of it) and frac_triad divides by the STREAM triad (3 arrays
// counted, as STREAM does) at the same thread count.
// layout "kn": b is row-major [K,N] (GPT-2 Conv1D); "nk_t": b is W[N,K].t() (nn.Linear), stride(0) == 1.
//
// OpenBLAS is a benchmark-only peer (not a dependency), loaded with dlopen("libopenblas.so.0"):
//   apt-get update && apt-get install -y libopenblas0-pthread
// Build and run (OpenBLAS pinned to its AVX-512 Cooperlake kernels and 2 threads; the program also
// sets these two variables itself, without overriding values given on the command line):
//   g++ -O3 -std=c++17 -march=native -I. bench/cpp/gemm_bench.cpp kernels/cpu/gemm.cpp kernels/cpu/probe.cpp
//       native/src/core/threadpool.cpp -ldl -lpthread -o /tmp/gemm_bench
//   OPENBLAS_CORETYPE=Cooperlake OPENBLAS_NUM_THREADS=2 /tmp/gemm_bench [quick]
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "../../kernels/cpu/gemm.h"
#include "../../kernels/cpu/probe.h"

namespace {

using Clock = std::chrono::steady_clock;

// cblas_sgemm(order, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)
using SgemmFn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*,
                         int);
using SetThreadsFn = void (*)(int);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

struct Blas {
  SgemmFn sgemm = nullptr;
  SetThreadsFn set_threads = nullptr;
  std::string why_not;
};

Blas load_openblas() {
  Blas b;
  setenv("OPENBLAS_CORETYPE", "Cooperlake", 0);
  setenv("OPENBLAS_NUM_THREADS", "2", 0);
  void* h = dlopen("libopenblas.so.0", RTLD_NOW | RTLD_LOCAL);
  if (h == nullptr) {
    const char* e = dlerror();
    b.why_not = std::string("dlopen(libopenblas.so.0) failed: ") + (e ? e : "?") +
                " (apt-get install -y libopenblas0-pthread)";
    return b;
  }
  b.sgemm = reinterpret_cast<SgemmFn>(dlsym(h, "cblas_sgemm"));
  b.set_threads = reinterpret_cast<SetThreadsFn>(dlsym(h, "openblas_set_num_threads"));
  if (b.sgemm == nullptr) b.why_not = "libopenblas.so.0 has no cblas_sgemm";
  return b;
}

struct Timing {
  double best_ms = 1e30, median_ms = 0;
};

// Runs fn `reps` times after `warm` untimed calls; best and median in ms.
template <class Fn>
Timing time_it(Fn&& fn, int warm, int reps) {
  for (int i = 0; i < warm; i++) fn();
  std::vector<double> ms;
  for (int i = 0; i < reps; i++) {
    auto t0 = Clock::now();
    fn();
    ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return {ms.front(), ms[ms.size() / 2]};
}
void merge(Timing& into, const Timing& t) {
  if (t.best_ms < into.best_ms) into.best_ms = t.best_ms;
  into.median_ms = into.median_ms == 0 ? t.median_ms : std::min(into.median_ms, t.median_ms);
}

// Let OpenBLAS's (or our pool's) spinning workers go to sleep before the other side runs.
void settle() { std::this_thread::sleep_for(std::chrono::milliseconds(150)); }

nx::KView view2d(void* data, nx::DType dt, int64_t r, int64_t c, int64_t s0, int64_t s1) {
  nx::KView v;
  v.data = data;
  v.dtype = dt;
  v.ndim = 2;
  v.shape[0] = r;
  v.shape[1] = c;
  v.strides[0] = s0;
  v.strides[1] = s1;
  return v;
}

// Weights stored as raw bytes of the requested dtype; `kn`: [K,N] row-major, else W[N,K] row-major.
struct Weights {
  std::vector<uint16_t> h;
  std::vector<float> f;
  nx::KView v;
};
Weights make_weights(int64_t K, int64_t N, nx::DType dt, bool kn, std::mt19937& rng) {
  Weights w;
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  const size_t n = static_cast<size_t>(K * N);
  void* data;
  if (dt == nx::DType::F32) {
    w.f.resize(n);
    for (auto& x : w.f) x = d(rng);
    data = w.f.data();
  } else {
    w.h.resize(n);
    for (auto& x : w.h) x = dt == nx::DType::BF16 ? nx::f32_to_bf16(d(rng)) : nx::f32_to_f16(d(rng));
    data = w.h.data();
  }
  w.v = kn ? view2d(data, dt, K, N, N, 1) : view2d(data, dt, K, N, 1, K);
  return w;
}

struct Peaks {
  double fma512[3] = {0, 0, 0};  // by thread count (index 1, 2)
  double fma256[3] = {0, 0, 0};
  double triad[3] = {0, 0, 0};
  double fma0[3] = {0, 0, 0};  // compiler-chosen code: only probed when neither SIMD ISA was compiled in
  double fma(int t) const { return fma512[t] > 0 ? fma512[t] : (fma256[t] > 0 ? fma256[t] : fma0[t]); }
};

// The probes run before every pass over the kernels and after the last one, and the best is kept: on
// a shared machine a probe that lost a core to another process would otherwise understate the peak
// (and overstate every fraction). Results are buffered and printed once the final peaks are known.
void probe_into(Peaks& pk) {
  for (int t = 1; t <= 2; t++) {
    pk.fma512[t] = std::max(pk.fma512[t], nx::probe_fma_peak_gflops(t, 512));
    pk.fma256[t] = std::max(pk.fma256[t], nx::probe_fma_peak_gflops(t, 256));
    if (pk.fma512[t] == 0 && pk.fma256[t] == 0)
      pk.fma0[t] = std::max(pk.fma0[t], nx::probe_fma_peak_gflops(t, 0));
    pk.triad[t] = std::max(pk.triad[t], nx::probe_triad_gbps(t, size_t{64} << 20));
  }
}

struct Result {
  bool matvec = false, blas = false;
  int64_t M, N, K;
  nx::DType dt;
  bool kn;
  int threads;
  Timing t;
  double bytes = 0, flops = 0, blas_ratio = 0;
};

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "quick") == 0;
  std::mt19937 rng(7);
  Blas blas = load_openblas();

  Peaks pk;
  std::vector<Result> results;
  std::vector<std::function<void()>> jobs;  // jobs[i] measures results[i] (and its OpenBLAS twin)
  const int passes = quick ? 3 : 5, rounds = 2, reps = 8;

  // ---- GEMM ----
  struct GemmCase {
    int64_t M, N, K;
  };
  std::vector<GemmCase> gcases = {{128, 3072, 768}};
  if (!quick) {
    gcases.push_back({128, 768, 3072});  // GPT-2 MLP down projection
    gcases.push_back({512, 2304, 768});  // GPT-2 QKV over a 512-token prefill
  }
  const nx::DType bdts[] = {nx::DType::F32, nx::DType::BF16, nx::DType::F16};
  struct Operands {  // kept alive for every pass
    std::vector<float> a, c;
    nx::KView av, cv;
    Weights w;
  };
  std::vector<std::unique_ptr<Operands>> ops;
  auto make_ops = [&](int64_t M, int64_t N, int64_t K, nx::DType dt, bool kn) {
    auto o = std::make_unique<Operands>();
    o->a.resize(static_cast<size_t>(M * K));
    o->c.resize(static_cast<size_t>(M * N));
    std::uniform_real_distribution<float> d(-1.0f, 1.0f);
    for (auto& x : o->a) x = d(rng);
    o->av = view2d(o->a.data(), nx::DType::F32, M, K, K, 1);
    o->cv = view2d(o->c.data(), nx::DType::F32, M, N, N, 1);
    o->w = make_weights(K, N, dt, kn, rng);
    ops.push_back(std::move(o));
    return ops.back().get();
  };
  for (const auto& gc : gcases) {
    const int64_t M = gc.M, N = gc.N, K = gc.K;
    const double flops = 2.0 * M * N * K;
    for (nx::DType dt : bdts) {
      if (quick && dt == nx::DType::F16) continue;
      for (bool kn : {true, false}) {
        Operands* o = make_ops(M, N, K, dt, kn);
        for (int threads : {1, 2}) {
          const bool with_blas = blas.sgemm != nullptr && dt == nx::DType::F32;
          const size_t idx = results.size();
          results.push_back(Result{false, false, M, N, K, dt, kn, threads, Timing{}, 0, flops, 0});
          if (with_blas) {
            Result rb = results.back();
            rb.blas = true;
            results.push_back(rb);
          }
          jobs.push_back([&, o, idx, threads, with_blas, M, N, K, kn] {
            nx::set_num_threads(threads);
            for (int r = 0; r < rounds; r++) {
              merge(results[idx].t, time_it([&] { nx::fast::gemm(o->av, o->w.v, nullptr, o->cv); }, 2, reps));
              if (with_blas) {
                settle();
                if (blas.set_threads) blas.set_threads(threads);
                merge(results[idx + 1].t,
                      time_it(
                          [&] {
                            blas.sgemm(kRowMajor, kNoTrans, kn ? kNoTrans : kTrans, static_cast<int>(M),
                                       static_cast<int>(N), static_cast<int>(K), 1.0f, o->a.data(),
                                       static_cast<int>(K), o->w.f.data(), static_cast<int>(kn ? N : K), 0.0f,
                                       o->c.data(), static_cast<int>(N));
                          },
                          2, reps));
                settle();
              }
            }
          });
          if (with_blas) jobs.push_back([] {});  // keeps jobs and results index-aligned
        }
      }
    }
  }

  // ---- matrix-vector (decode): weights far larger than the 32 MiB L3 ----
  struct MvCase {
    int64_t M, N, K;
    nx::DType dt;
  };
  std::vector<MvCase> mcases = {{1, 4096, 4096, nx::DType::F32}, {1, 8192, 4096, nx::DType::BF16}};
  if (!quick) {
    mcases.push_back({1, 8192, 4096, nx::DType::F16});
    mcases.push_back({4, 4096, 4096, nx::DType::F32});
    mcases.push_back({8, 4096, 4096, nx::DType::F32});
  }
  for (const auto& mc : mcases) {
    const int64_t M = mc.M, N = mc.N, K = mc.K;
    const double bytes = static_cast<double>(K * N) * nx::dtype_size(mc.dt);
    for (bool kn : {true, false}) {
      Operands* o = make_ops(M, N, K, mc.dt, kn);
      for (int threads : {1, 2}) {
        const size_t idx = results.size();
        results.push_back(Result{true, false, M, N, K, mc.dt, kn, threads, Timing{}, bytes, 0, 0});
        jobs.push_back([&, o, idx, threads] {
          nx::set_num_threads(threads);
          for (int r = 0; r < rounds; r++)
            merge(results[idx].t, time_it([&] { nx::fast::gemm(o->av, o->w.v, nullptr, o->cv); }, 2, reps));
        });
      }
    }
  }

  // Every pass measures every configuration briefly and keeps the best: on a shared machine the
  // measurements of one configuration are spread over the whole run, so each has a chance at a quiet
  // moment (a noisy stretch of a few seconds cannot spoil one configuration entirely).
  for (int pass = 0; pass < passes; pass++) {
    probe_into(pk);
    for (auto& job : jobs) job();
    std::fprintf(stderr, ".");
  }
  std::fprintf(stderr, "\n");
  for (size_t i = 0; i < results.size(); i++)
    if (results[i].blas) results[i].blas_ratio = results[i].t.best_ms / results[i - 1].t.best_ms;

  probe_into(pk);
  for (int t = 1; t <= 2; t++)
    std::printf("{\"bench\":\"probe\",\"threads\":%d,\"fma512_gflops\":%.1f,\"fma256_gflops\":%.1f,"
                "\"triad_gbps\":%.1f,\"triad_mib_per_array\":64,"
                "\"note\":\"best of runs before each pass and after the last\"}\n",
                t, pk.fma512[t], pk.fma256[t], pk.triad[t]);
  if (blas.sgemm == nullptr)
    std::printf("{\"bench\":\"gemm\",\"impl\":\"openblas\",\"skipped\":\"%s\"}\n", blas.why_not.c_str());
  for (const Result& r : results) {
    const long long M = r.M, N = r.N, K = r.K;
    if (r.matvec) {
      const double gbps = r.bytes / (r.t.best_ms * 1e6);
      std::printf("{\"bench\":\"gemm\",\"impl\":\"nx\",\"kind\":\"matvec\",\"M\":%lld,\"N\":%lld,\"K\":%lld,"
                  "\"b_dtype\":\"%s\",\"layout\":\"%s\",\"threads\":%d,\"ms\":%.4f,\"ms_median\":%.4f,"
                  "\"weight_mib\":%.0f,\"gbps\":%.1f,\"frac_triad\":%.3f}\n",
                  M, N, K, nx::dtype_name(r.dt), r.kn ? "kn" : "nk_t", r.threads, r.t.best_ms, r.t.median_ms,
                  r.bytes / 1048576.0, gbps, gbps / pk.triad[r.threads]);
    } else {
      const double gf = r.flops / (r.t.best_ms * 1e6);
      std::printf("{\"bench\":\"gemm\",\"impl\":\"%s\",\"M\":%lld,\"N\":%lld,\"K\":%lld,\"b_dtype\":\"%s\","
                  "\"layout\":\"%s\",\"threads\":%d,\"ms\":%.4f,\"ms_median\":%.4f,\"gflops\":%.1f,"
                  "\"frac_fma_peak\":%.3f",
                  r.blas ? "openblas" : "nx", M, N, K, nx::dtype_name(r.dt), r.kn ? "kn" : "nk_t", r.threads,
                  r.t.best_ms, r.t.median_ms, gf, gf / pk.fma(r.threads));
      if (r.blas)
        std::printf(",\"coretype\":\"%s\",\"speedup_nx\":%.3f", std::getenv("OPENBLAS_CORETYPE"), r.blas_ratio);
      std::printf("}\n");
    }
  }
  return 0;
}
