// attention_bench.cpp: times nx::fast::attention (decode and prefill) and nx::fast::rope.
//
// Prints one JSON line per result:
//   {"bench":"attention"|"rope","case":...,"dtype":...,"shape":...,"threads":N,"ms":...,"gbps":...}
// ms is the median over the repetitions; gbps = (bytes read + bytes written, each once) / time, so it
// can be set against the machine's read bandwidth (shared/perf/triad.c).
//   decode:  B=1, Hq=32, Hkv=8, D=64, Tq=1, Tk=1024 (k/v windows of a [B, Hkv, 2048, D] cache; G = 4,
//            the 4-row tile path)
//   decode_g8: as decode with Hkv=4 (G = 8: the lane path; kernels.mjs's llama-850m-like case)
//   prefill: B=1, H=12, D=64, T=128 (causal)
//   rope:    x [1, 128, 32, 64], rotate_half and interleaved, in place
//
// Build and run (threads: every count from 1 to the pool size):
//   g++ -O3 -std=c++17 -march=native -I. bench/cpp/attention_bench.cpp kernels/cpu/attention.cpp
//     native/src/core/threadpool.cpp -lpthread -o /tmp/attn_bench && /tmp/attn_bench
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "../../kernels/cpu/attention.h"

namespace {

struct Tensor {  // dense buffer + view
  std::vector<unsigned char> mem;
  nx::KView v;
};

Tensor make(std::vector<int64_t> shape, nx::DType dt) {
  Tensor t;
  t.v.dtype = dt;
  t.v.ndim = static_cast<int>(shape.size());
  int64_t s = 1;
  for (int i = t.v.ndim - 1; i >= 0; i--) {
    t.v.shape[i] = shape[i];
    t.v.strides[i] = s;
    s *= shape[i];
  }
  t.mem.assign(static_cast<size_t>(s) * nx::dtype_size(dt) + 64, 0);
  t.v.data = t.mem.data();
  std::mt19937 g(7);
  std::uniform_real_distribution<float> d(-1, 1);
  for (int64_t i = 0; i < s; i++) nx::store_f32(t.v.data, dt, i, d(g));
  return t;
}

double median_ms(const std::function<void()>& fn, int reps) {
  for (int i = 0; i < 3; i++) fn();  // warm caches and the pool
  std::vector<double> ms;
  for (int i = 0; i < reps; i++) {
    auto t0 = std::chrono::steady_clock::now();
    fn();
    auto t1 = std::chrono::steady_clock::now();
    ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

void emit(const char* bench, const std::string& cs, const char* dtype, const std::string& shape, double ms,
          double bytes) {
  std::printf("{\"bench\":\"%s\",\"case\":\"%s\",\"dtype\":\"%s\",\"shape\":\"%s\",\"threads\":%d,\"ms\":%.4f,\"gbps\":%.2f}\n",
              bench, cs.c_str(), dtype, shape.c_str(), nx::num_threads(), ms, bytes / (ms * 1e-3) / 1e9);
  std::fflush(stdout);
}

void bench_decode(nx::DType dt) {
  const int64_t B = 1, Hq = 32, Hkv = 8, D = 64, Tk = 1024, maxT = 2048;
  Tensor q = make({B, Hq, 1, D}, nx::DType::F32);
  Tensor kc = make({B, Hkv, maxT, D}, dt), vc = make({B, Hkv, maxT, D}, dt);
  nx::KView k = kc.v, v = vc.v;
  k.shape[2] = v.shape[2] = Tk;
  Tensor out = make({B, Hq, 1, D}, nx::DType::F32);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  double ms = median_ms([&] { nx::fast::attention(q.v, k, v, nullptr, scale, out.v); }, 200);
  const double bytes = 2.0 * B * Hkv * Tk * D * nx::dtype_size(dt) + 2.0 * B * Hq * D * 4;
  emit("attention", "decode", nx::dtype_name(dt), "B=1,Hq=32,Hkv=8,D=64,Tq=1,Tk=1024", ms, bytes);

  // decode_cold: 24 layers' caches used in turn (192 MiB of f32 K/V windows > L3), as in a real forward
  // pass, so K/V come from DRAM rather than from the L3 a single repeated call enjoys.
  const int L = 24;
  std::vector<Tensor> ks, vs;
  for (int l = 0; l < L; l++) ks.push_back(make({B, Hkv, maxT, D}, dt)), vs.push_back(make({B, Hkv, maxT, D}, dt));
  double ms_all = median_ms([&] {
    for (int l = 0; l < L; l++) {
      nx::KView kl = ks[l].v, vl = vs[l].v;
      kl.shape[2] = vl.shape[2] = Tk;
      nx::fast::attention(q.v, kl, vl, nullptr, scale, out.v);
    }
  }, 20);
  emit("attention", "decode_cold", nx::dtype_name(dt), "B=1,Hq=32,Hkv=8,D=64,Tq=1,Tk=1024", ms_all / L, bytes);
}

void bench_decode_g8() {
  const int64_t B = 1, Hq = 32, Hkv = 4, D = 64, Tk = 1024, maxT = 2048;
  Tensor q = make({B, Hq, 1, D}, nx::DType::F32);
  Tensor kc = make({B, Hkv, maxT, D}, nx::DType::F32), vc = make({B, Hkv, maxT, D}, nx::DType::F32);
  nx::KView k = kc.v, v = vc.v;
  k.shape[2] = v.shape[2] = Tk;
  Tensor out = make({B, Hq, 1, D}, nx::DType::F32);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  double ms = median_ms([&] { nx::fast::attention(q.v, k, v, nullptr, scale, out.v); }, 500);
  const double bytes = 2.0 * B * Hkv * Tk * D * 4 + 2.0 * B * Hq * D * 4;
  emit("attention", "decode_g8", "float32", "B=1,Hq=32,Hkv=4,D=64,Tq=1,Tk=1024", ms, bytes);
}

void bench_prefill() {
  const int64_t B = 1, H = 12, D = 64, T = 128;
  Tensor q = make({B, H, T, D}, nx::DType::F32), k = make({B, H, T, D}, nx::DType::F32);
  Tensor v = make({B, H, T, D}, nx::DType::F32), out = make({B, H, T, D}, nx::DType::F32);
  double ms = median_ms([&] { nx::fast::attention(q.v, k.v, v.v, nullptr, 0.125f, out.v); }, 100);
  const double bytes = 4.0 * B * H * T * D * 4;
  emit("attention", "prefill", "float32", "B=1,H=12,D=64,T=128", ms, bytes);
}

void bench_rope(bool interleaved) {
  const int64_t B = 1, T = 128, H = 32, D = 64;
  Tensor x = make({B, T, H, D}, nx::DType::F32);
  Tensor pos = make({B, T}, nx::DType::I64);
  for (int64_t t = 0; t < T; t++) pos.v.ptr<int64_t>()[t] = t;
  Tensor f = make({D / 2}, nx::DType::F32);
  for (int64_t i = 0; i < D / 2; i++) f.v.ptr<float>()[i] = static_cast<float>(std::pow(10000.0, -2.0 * i / D));
  double ms = median_ms([&] { nx::fast::rope(x.v, pos.v, f.v, interleaved, x.v); }, 200);
  const double bytes = 2.0 * B * T * H * D * 4;
  emit("rope", interleaved ? "interleaved" : "rotate_half", "float32", "x=[1,128,32,64]", ms, bytes);
}

}  // namespace

int main() {
  const int maxt = nx::num_threads();
  for (int t = 1; t <= maxt; t++) {
    nx::set_num_threads(t);
    bench_decode(nx::DType::F32);
    bench_decode(nx::DType::BF16);
    bench_decode_g8();
    bench_prefill();
    bench_rope(false);
    bench_rope(true);
  }
  return 0;
}
