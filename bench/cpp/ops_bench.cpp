// ops_bench.cpp: timings of the fast CPU kernels on transformer-sized shapes.
//
// Prints ONE JSON line per result:
//   {"bench":"rmsnorm","shape":[128,768],"dtype":"float32","threads":2,"ms":0.012,"gbps":65.1}
// ms is the median of repeated runs (after a warm-up) and gbps = bytes moved / time, counting every
// input read once and every output written once (the kernel's minimum traffic; caches may do better
// for small shapes). Each case runs with 1 thread and with the pool's full size.
//
// Cases: rmsnorm [128,768] and [1024,4096] (f32 x, f32 weight; plus bf16 x/weight/out at [1024,4096]),
// softmax [8*12*128, 128] rows, add f32 with 16M elements, gelu (tanh, GPT-2) on [128, 3072].
//
// Build and run:
//   g++ -O3 -std=c++17 -march=native -I. bench/cpp/ops_bench.cpp kernels/cpu/elementwise.cpp
//     kernels/cpu/reduce.cpp kernels/cpu/norm.cpp native/src/core/threadpool.cpp -lpthread -o /tmp/ops_bench
//   /tmp/ops_bench [filter]        (NX_THREADS=n caps the pool)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "../../kernels/common.h"
#include "../../kernels/cpu/elementwise.h"
#include "../../kernels/cpu/norm.h"
#include "../../kernels/cpu/reduce.h"

namespace {

struct Tensor {
  std::vector<unsigned char> mem;
  nx::KView v;
};

Tensor make(const std::vector<int64_t>& shape, nx::DType dt, float lo = -1, float hi = 1) {
  Tensor t;
  t.v.dtype = dt;
  t.v.ndim = static_cast<int>(shape.size());
  int64_t n = 1;
  for (int i = t.v.ndim - 1; i >= 0; i--) {
    t.v.shape[i] = shape[static_cast<size_t>(i)];
    t.v.strides[i] = n;
    n *= shape[static_cast<size_t>(i)];
  }
  t.mem.resize(static_cast<size_t>(n) * nx::dtype_size(dt) + 64);
  t.v.data = t.mem.data();
  std::mt19937 g(7);
  std::uniform_real_distribution<float> d(lo, hi);
  for (int64_t i = 0; i < n; i++) nx::store_f32(t.v.data, dt, i, d(g));
  return t;
}

double median_ms(const std::function<void()>& fn) {
  fn();  // warm-up (page faults, pool start)
  std::vector<double> ts;
  auto t_end = std::chrono::steady_clock::now() + std::chrono::milliseconds(300);
  while (ts.size() < 5 || (std::chrono::steady_clock::now() < t_end && ts.size() < 2000)) {
    auto t0 = std::chrono::steady_clock::now();
    fn();
    auto t1 = std::chrono::steady_clock::now();
    ts.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

void report(const char* bench, const std::vector<int64_t>& shape, nx::DType dt, double bytes, const std::function<void()>& fn) {
  double ms = median_ms(fn);
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); i++) s += (i ? "," : "") + std::to_string(shape[i]);
  s += "]";
  std::printf("{\"bench\":\"%s\",\"shape\":%s,\"dtype\":\"%s\",\"threads\":%d,\"ms\":%.4f,\"gbps\":%.2f}\n", bench,
              s.c_str(), nx::dtype_name(dt), nx::num_threads(), ms, bytes / (ms * 1e-3) / 1e9);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string filter = argc > 1 ? argv[1] : "";
  const int max_threads = std::getenv("NX_THREADS") ? std::atoi(std::getenv("NX_THREADS")) : nx::num_threads();
  auto want = [&](const char* name) { return filter.empty() || filter == name; };
  std::vector<int> thread_counts = {1};
  if (max_threads > 1) thread_counts.push_back(max_threads);

  for (int th : thread_counts) {
    nx::set_num_threads(th);
    if (want("rmsnorm")) {
      for (auto shape : {std::vector<int64_t>{128, 768}, std::vector<int64_t>{8 * 128, 4096}}) {
        for (nx::DType dt : {nx::DType::F32, nx::DType::BF16}) {
          if (dt == nx::DType::BF16 && shape[0] == 128) continue;
          Tensor x = make(shape, dt), w = make({shape[1]}, dt, 0.5f, 1.5f), o = make(shape, dt);
          double sz = static_cast<double>(nx::dtype_size(dt));
          double bytes = (2.0 * shape[0] * shape[1] + shape[1]) * sz;
          report("rmsnorm", shape, dt, bytes, [&] { nx::fast::rmsnorm(x.v, &w.v, 1e-6f, o.v); });
        }
      }
    }
    if (want("softmax")) {
      std::vector<int64_t> shape = {8 * 12 * 128, 128};
      Tensor x = make(shape, nx::DType::F32, -8, 8), o = make(shape, nx::DType::F32);
      report("softmax", shape, nx::DType::F32, 2.0 * shape[0] * shape[1] * 4, [&] { nx::fast::softmax(x.v, -1, false, o.v); });
    }
    if (want("add")) {
      std::vector<int64_t> shape = {16 * 1024 * 1024};
      Tensor a = make(shape, nx::DType::F32), b = make(shape, nx::DType::F32), o = make(shape, nx::DType::F32);
      report("add", shape, nx::DType::F32, 3.0 * shape[0] * 4, [&] { nx::fast::binary(nx::BinaryOp::ADD, a.v, b.v, o.v); });
    }
    if (want("gelu")) {
      std::vector<int64_t> shape = {128, 3072};
      Tensor x = make(shape, nx::DType::F32, -4, 4), o = make(shape, nx::DType::F32);
      report("gelu", shape, nx::DType::F32, 2.0 * shape[0] * shape[1] * 4,
             [&] { nx::fast::unary(nx::UnaryOp::GELU_TANH, x.v, o.v); });
    }
  }
  return 0;
}
