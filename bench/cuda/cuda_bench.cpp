// cuda_bench.cpp: timings of the CUDA kernels (kernels/cuda) on transformer-sized shapes, one per kernel
// family. Built only in CUDA builds (build/nx_cuda_bench); `node bench/kernels.mjs` and
// `nnsight bench kernels` run it after the CPU kernels (bench/cuda-kernels.mjs).
//
// Prints ONE JSON line per result:
//   {"bench":"kernels.cuda.rmsnorm","shape":[1024,4096],"dtype":"float32","device":"NVIDIA H100 ...","ms":0.021,
//    "best_ms":0.020,"gbps":1598.2,"reps":7,"note":"..."}
// ms = median over `reps` timed batches, each batch launching the kernel back to back until >= 20 ms of
// work and dividing by the count (launch overhead included: it matters for the small shapes); gbps =
// the bytes a kernel must move (every input read once, every output written once) / time; gflops for
// GEMMs (2 M N K). Without a usable GPU it prints one line {"bench":"kernels.cuda.skip","reason":...}
// and exits 0.
//
//   build/nx_cuda_bench [filter]      (cases whose name contains filter)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "../../kernels/common.h"
#include "../../kernels/cuda/cuda.h"

namespace {

std::string g_device;
const char* g_filter = "";

struct DBuf {
  void* p = nullptr;
  size_t n = 0;
  nx::KView v;
  DBuf(const std::vector<int64_t>& shape, nx::DType dt, double lo = -1, double hi = 1) {
    v.dtype = dt;
    v.ndim = static_cast<int>(shape.size());
    int64_t s = 1;
    for (int i = v.ndim - 1; i >= 0; i--) {
      v.shape[i] = shape[i];
      v.strides[i] = s;
      s *= shape[i];
    }
    n = static_cast<size_t>(s) * nx::dtype_size(dt);
    p = nx::cuda::device_alloc(0, n);
    v.data = p;
    std::vector<unsigned char> host(n);
    std::mt19937_64 g(42);
    std::uniform_real_distribution<double> d(lo, hi);
    for (int64_t i = 0; i < s; i++) {
      if (nx::dtype_is_float(dt))
        nx::store_f32(host.data(), dt, i, static_cast<float>(d(g)));
      else
        nx::store_i64(host.data(), dt, i, static_cast<int64_t>(d(g)));
    }
    nx::cuda::copy_h2d(p, host.data(), n);
  }
  ~DBuf() { nx::cuda::device_free(0, p, n); }
  DBuf(const DBuf&) = delete;
  DBuf& operator=(const DBuf&) = delete;
};

// A string as a JSON string body (quotes, backslashes and control characters escaped).
std::string esc(const std::string& in) {
  std::string r;
  for (char c : in) {
    if (c == '"' || c == '\\') {
      r += '\\';
      r += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      r += ' ';
    } else {
      r += c;
    }
  }
  return r;
}

std::string shape_json(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); i++) r += (i ? "," : "") + std::to_string(s[i]);
  return r + "]";
}

struct Timing {
  double median_ms, best_ms;
  int reps;
};

Timing time_it(const std::function<void()>& fn) {
  using clk = std::chrono::steady_clock;
  fn();  // warm-up (and first-use costs: cuBLAS handle, module load)
  nx::cuda::synchronize(0);
  // calibrate: launches per batch for >= 20 ms
  int per = 1;
  for (;;) {
    auto t0 = clk::now();
    for (int i = 0; i < per; i++) fn();
    nx::cuda::synchronize(0);
    double ms = std::chrono::duration<double, std::milli>(clk::now() - t0).count();
    if (ms >= 20 || per >= (1 << 16)) break;
    per *= 2;
  }
  std::vector<double> ts;
  for (int r = 0; r < 7; r++) {
    auto t0 = clk::now();
    for (int i = 0; i < per; i++) fn();
    nx::cuda::synchronize(0);
    ts.push_back(std::chrono::duration<double, std::milli>(clk::now() - t0).count() / per);
  }
  std::sort(ts.begin(), ts.end());
  return {ts[ts.size() / 2], ts[0], static_cast<int>(ts.size())};
}

void report(const std::string& name, const std::vector<int64_t>& shape, nx::DType dt, double bytes, double flops,
            const std::function<void()>& fn, const std::string& note = "") {
  if (name.find(g_filter) == std::string::npos) return;
  try {
    Timing t = time_it(fn);
    std::printf("{\"bench\":\"kernels.cuda.%s\",\"shape\":%s,\"dtype\":\"%s\",\"device\":\"%s\",\"threads\":null,\"ms\":%.5f,"
                "\"best_ms\":%.5f,\"reps\":%d",
                name.c_str(), shape_json(shape).c_str(), nx::dtype_name(dt), esc(g_device).c_str(), t.median_ms, t.best_ms, t.reps);
    if (bytes > 0) std::printf(",\"gbps\":%.2f", bytes / (t.median_ms * 1e6));
    if (flops > 0) std::printf(",\"gflops\":%.1f", flops / (t.median_ms * 1e6));
    if (!note.empty()) std::printf(",\"note\":\"%s\"", esc(note).c_str());
    std::printf("}\n");
  } catch (const std::exception& e) {
    std::printf("{\"bench\":\"kernels.cuda.skip\",\"case\":\"%s\",\"reason\":\"%s\"}\n", name.c_str(), esc(e.what()).c_str());
  }
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1) g_filter = argv[1];
  std::string why;
  if (!nx::cuda::available(&why)) {
    std::printf("{\"bench\":\"kernels.cuda.skip\",\"shape\":null,\"threads\":null,\"ms\":null,\"reason\":\"CUDA not available: %s\"}\n",
                esc(why).c_str());
    return 0;
  }
  nx::cuda::set_device(0);
  g_device = nx::cuda::device_name(0);
  using nx::DType;
  const double f4 = 4, b2 = 2;
  {  // elementwise
    const int64_t n = 16 << 20;
    DBuf a({n}, DType::F32), b({n}, DType::F32), o({n}, DType::F32), h({n}, DType::BF16);
    report("add", {n}, DType::F32, 3 * n * f4, 0, [&] { nx::cuda::binary(nx::BinaryOp::ADD, a.v, b.v, o.v); });
    report("gelu_tanh", {n}, DType::F32, 2 * n * f4, 0, [&] { nx::cuda::unary(nx::UnaryOp::GELU_TANH, a.v, o.v); });
    report("cast_f32_bf16", {n}, DType::BF16, n * (f4 + b2), 0, [&] { nx::cuda::cast(a.v, h.v); });
    report("fill", {n}, DType::F32, n * f4, 0, [&] { nx::cuda::fill(o.v, 1.5); });
    DBuf c({n}, DType::BOOL, 0, 2);
    report("where", {n}, DType::F32, n * (1 + 3 * f4), 0, [&] { nx::cuda::where(c.v, a.v, b.v, o.v); });
  }
  {  // reductions, softmax
    DBuf x({1024, 4096}, DType::F32), r({1024, 1}, DType::F32), ri({1024, 1}, DType::I64), y({1024, 4096}, DType::F32);
    const double xb = 1024.0 * 4096 * f4;
    report("sum_lastdim", {1024, 4096}, DType::F32, xb, 0, [&] { nx::cuda::reduce(nx::ReduceOp::SUM, x.v, 1, r.v); });
    report("argmax_lastdim", {1024, 4096}, DType::F32, xb, 0, [&] { nx::cuda::reduce(nx::ReduceOp::ARGMAX, x.v, 1, ri.v); });
    report("cumsum_lastdim", {1024, 4096}, DType::F32, 2 * xb, 0, [&] { nx::cuda::cumsum(x.v, 1, y.v); },
           "one thread per line: slow by design");
    DBuf s({8 * 12 * 128, 128}, DType::F32), so({8 * 12 * 128, 128}, DType::F32);
    report("softmax", {8 * 12 * 128, 128}, DType::F32, 2.0 * 8 * 12 * 128 * 128 * f4, 0, [&] { nx::cuda::softmax(s.v, 1, false, so.v); });
    DBuf w({4096}, DType::F32), bb({4096}, DType::F32);
    report("rmsnorm", {1024, 4096}, DType::F32, 2 * xb, 0, [&] { nx::cuda::rmsnorm(x.v, &w.v, 1e-6f, y.v); });
    report("layernorm", {1024, 4096}, DType::F32, 2 * xb, 0, [&] { nx::cuda::layernorm(x.v, &w.v, &bb.v, 1e-5f, y.v); });
  }
  {  // rope, attention
    DBuf x({1, 512, 32, 128}, DType::F32), o({1, 512, 32, 128}, DType::F32), pos({1, 512}, DType::I32, 0, 4000), inv({64}, DType::F32, 0, 1);
    report("rope", {1, 512, 32, 128}, DType::F32, 2.0 * 512 * 32 * 128 * f4, 0, [&] { nx::cuda::rope(x.v, pos.v, inv.v, false, o.v); });
    DBuf q({1, 32, 512, 128}, DType::F32), k({1, 32, 512, 128}, DType::F32), v({1, 32, 512, 128}, DType::F32),
        ao({1, 32, 512, 128}, DType::F32);
    report("attention_prefill", {1, 32, 512, 512, 128}, DType::F32, 4.0 * 32 * 512 * 128 * f4, 4.0 * 32 * 512 * 512 / 2 * 128,
           [&] { nx::cuda::attention(q.v, k.v, v.v, nullptr, 0.088f, ao.v); }, "shape [B, H, Tq, Tk, D]; simple kernel, not flash");
    DBuf dq({1, 32, 1, 128}, DType::F32), dk({1, 8, 2048, 128}, DType::F32), dv({1, 8, 2048, 128}, DType::F32), dout({1, 32, 1, 128}, DType::F32);
    report("attention_decode", {1, 32, 8, 1, 2048, 128}, DType::F32, 2.0 * 8 * 2048 * 128 * f4, 0,
           [&] { nx::cuda::attention(dq.v, dk.v, dv.v, nullptr, 0.088f, dout.v); }, "shape [B, Hq, Hkv, Tq, Tk, D]");
  }
  {  // indexing
    DBuf table({32000, 4096}, DType::BF16), ids({512}, DType::I32, 0, 31999), out({512, 4096}, DType::F32);
    report("embedding", {512, 4096}, DType::BF16, 512.0 * 4096 * (b2 + f4), 0, [&] { nx::cuda::embedding(table.v, ids.v, out.v); },
           "includes the index check (one stream sync)");
    DBuf logits({8, 32000}, DType::F32), tv({8, 50}, DType::F32), ti({8, 50}, DType::I64);
    report("topk50", {8, 32000}, DType::F32, 8.0 * 32000 * f4, 0, [&] { nx::cuda::topk(logits.v, 50, tv.v, ti.v); });
    DBuf sel({256}, DType::I64, 0, 4095), so({1024, 256}, DType::F32), x({1024, 4096}, DType::F32);
    report("index_select", {1024, 256}, DType::F32, 2.0 * 1024 * 256 * f4, 0, [&] { nx::cuda::index_select(x.v, 1, sel.v, so.v); });
    DBuf gi({1024, 256}, DType::I64, 0, 4095), go({1024, 256}, DType::F32);
    report("gather", {1024, 256}, DType::F32, 2.0 * 1024 * 256 * f4, 0, [&] { nx::cuda::gather(x.v, 1, gi.v, go.v); });
    report("scatter", {1024, 256}, DType::F32, 2.0 * 1024 * 256 * f4, 0, [&] { nx::cuda::scatter(x.v, 1, gi.v, go.v); });
  }
  {  // GEMM and matvec, through cuBLAS (when it loads) and the fallback kernel
    std::string bw;
    const bool blas = nx::cuda::cublas_available(&bw);
    if (!blas) std::printf("{\"bench\":\"kernels.cuda.skip\",\"case\":\"gemm cublas\",\"reason\":\"%s\"}\n", esc(bw).c_str());
    struct G {
      int64_t M, K, N;
    };
    for (G s : {G{128, 768, 3072}, G{1024, 4096, 4096}, G{1, 4096, 4096}}) {
      for (DType wt : {DType::F32, DType::BF16}) {
        DBuf a({s.M, s.K}, DType::F32), w({s.N, s.K}, wt), o({s.M, s.N}, DType::F32);
        nx::KView wT = w.v;  // the nn.Linear layout: [N, K] used as [K, N] through a transposed view
        std::swap(wT.shape[0], wT.shape[1]);
        std::swap(wT.strides[0], wT.strides[1]);
        const double flops = 2.0 * s.M * s.N * s.K;
        const double bytes = s.M * s.K * f4 + s.K * s.N * nx::dtype_size(wt) + s.M * s.N * f4;
        const std::string nm = std::string(s.M == 1 ? "matvec_" : "gemm_") + std::to_string(s.M) + "x" + std::to_string(s.K) + "x" +
                               std::to_string(s.N);
        for (int path = 0; path < 2; path++) {
          if (path == 1 && !blas) continue;
          if (path == 0 && s.M * s.N * s.K > (int64_t(1) << 34)) continue;  // the fallback is too slow for the big one
          nx::cuda::set_gemm_path(path ? nx::cuda::GemmPath::CUBLAS : nx::cuda::GemmPath::KERNEL);
          report(nm + (path ? "_cublas" : "_kernel"), {s.M, s.K, s.N}, wt, bytes, flops, [&] { nx::cuda::gemm(a.v, wT, nullptr, o.v); },
                 wt == DType::BF16 && path == 1 ? "bf16 weights widened to f32 scratch on every call" : "");
        }
        nx::cuda::set_gemm_path(nx::cuda::GemmPath::AUTO);
      }
    }
  }
  return 0;
}
