// runtime_test.cpp: the CUDA runtime pieces (allocator, copies) and the core dispatcher on CUDA tensors:
// nx::run_op over tensors moved with nx::to_device must give what it gives on the CPU (the same checks
// and output layouts; the kernels' tolerances as in the kernel tests), mixed devices are a DEVICE
// error, and moving back and forth is exact.
#include <cstring>
#include <string>
#include <vector>

#include "../../kernels/cuda/cuda.h"
#include "../../native/src/core/executor.h"
#include "../../native/src/core/ops.h"
#include "../../native/src/core/ops_cuda.h"
#include "harness.h"

using nx::DType;
using nx::Op;
using nx::Tensor;

namespace {

Tensor host_random(const nx::Shape& shape, DType dt, double lo = -1, double hi = 1) {
  Tensor t = Tensor::empty(shape, dt, /*real=*/true);
  std::uniform_real_distribution<double> d(lo, hi);
  const int64_t n = t.numel();
  for (int64_t i = 0; i < n; i++) {
    if (nx::dtype_is_float(dt))
      nx::store_f32(t.data(), dt, i, static_cast<float>(d(nxc::rng())));
    else
      nx::store_i64(t.data(), dt, i, static_cast<int64_t>(std::floor(d(nxc::rng()) + 0.5)));
  }
  return t;
}

std::vector<float> values(const Tensor& t) {  // any device, any layout -> row-major f32 on the host
  Tensor h = nx::to_device(t, -1);
  Tensor d = nx::run_op(Op::CAST, {&h}, {static_cast<double>(static_cast<int>(DType::F32))})[0];
  nx::executor().sync();
  nx::device_sync();
  if (auto e = d.storage->get_error()) throw *e;
  std::vector<float> r(static_cast<size_t>(d.numel()));
  if (!r.empty()) std::memcpy(r.data(), d.data(), r.size() * 4);
  return r;
}

void expect_close(const Tensor& got, const Tensor& want, double atol, double rtol, const std::string& what) {
  NXC_EXPECT(got.shape == want.shape && got.dtype == want.dtype && got.strides == want.strides, "%s: layout differs", what.c_str());
  NXC_EXPECT(got.device() == 0 && want.device() == -1, "%s: devices %d / %d", what.c_str(), got.device(), want.device());
  const auto g = values(got), w = values(want);
  double worst = 0;
  size_t wi = 0;
  for (size_t i = 0; i < g.size() && i < w.size(); i++) {
    const double diff = std::isnan(g[i]) || std::isnan(w[i]) ? (std::isnan(g[i]) && std::isnan(w[i]) ? 0 : 1e30) : std::fabs(g[i] - w[i]);
    const double r = diff / (atol + rtol * std::fabs(w[i]) + 1e-300);
    if (r > worst) {
      worst = r;
      wi = i;
    }
  }
  NXC_EXPECT(worst <= 1.0, "%s: element %zu got %.9g want %.9g", what.c_str(), wi, g.empty() ? 0.f : g[wi], w.empty() ? 0.f : w[wi]);
}

}  // namespace

NXC_TEST(cuda_allocator_and_copies) {
  const size_t before = nx::cuda::device_bytes_in_use();
  void* p = nx::cuda::device_alloc(0, 1000);
  NXC_EXPECT(nx::cuda::device_bytes_in_use() >= before + 1000, "in use grows");
  nx::cuda::device_free(0, p, 1000);
  void* q = nx::cuda::device_alloc(0, 1000);
  NXC_EXPECT(q == p, "a freed block of the same size is reused");
  // h2d -> d2d -> d2h round trip of odd sizes
  for (size_t n : {size_t(1), size_t(7), size_t(4099), size_t(3) << 20}) {
    std::vector<unsigned char> src(n), back(n, 0);
    for (size_t i = 0; i < n; i++) src[i] = static_cast<unsigned char>(i * 131 + 7);
    void* a = nx::cuda::device_alloc(0, n);
    void* b = nx::cuda::device_alloc(0, n);
    nx::cuda::copy_h2d(a, src.data(), n);
    nx::cuda::copy_d2d(b, a, n);
    nx::cuda::copy_d2h(back.data(), b, n);
    NXC_EXPECT(src == back, "round trip of %zu bytes", n);
    nx::cuda::device_free(0, a, n);
    nx::cuda::device_free(0, b, n);
  }
  nx::cuda::device_free(0, q, 1000);
}

NXC_TEST(cuda_to_device_round_trip) {
  for (DType dt : {DType::F32, DType::BF16, DType::I64, DType::BOOL}) {
    Tensor h = host_random({3, 5, 7}, dt, -9, 9);
    // a non-contiguous view: transposed and sliced
    Tensor v = h.view({7, 3}, {1, 35}, 2 * 7);
    Tensor g = nx::to_device(v, 0);
    NXC_EXPECT(g.device() == 0 && g.is_contiguous(), "to_device gives a contiguous device tensor");
    Tensor back = nx::to_device(g, -1);
    const auto a = values(v), b = values(back);
    NXC_EXPECT(a == b, "round trip %s", nx::dtype_name(dt));
    // device -> device (strided): a transposed view of the device tensor copied densely on the device
    Tensor gt = g.view({3, 7}, {1, 3}, 0);
    Tensor c = nx::run_op(Op::CAST, {&gt}, {static_cast<double>(static_cast<int>(dt))})[0];
    const auto want = values(v.view({3, 7}, {35, 1}, 2 * 7));
    NXC_EXPECT(values(c) == want, "strided copy on the device %s", nx::dtype_name(dt));
  }
}

NXC_TEST(cuda_run_op_matches_cpu) {
  // Each op through run_op on CPU tensors and on their device copies: same output layout, close values.
  // Tolerances are the kernel tests' (see the *_test.cpp beside this file), loosened to the largest of
  // an op family since these are whole-op checks, not the place to pin ulps.
  Tensor x = host_random({2, 3, 8}, DType::F32, -2, 2), y = host_random({2, 3, 8}, DType::F32, -2, 2);
  Tensor gx = nx::to_device(x, 0), gy = nx::to_device(y, 0);
  auto both = [&](Op op, std::vector<const Tensor*> cpu, std::vector<const Tensor*> gpu, std::vector<double> at, double atol,
                  double rtol, const char* what) {
    auto w = nx::run_op(op, cpu, at);
    auto g = nx::run_op(op, gpu, at);
    NXC_EXPECT(w.size() == g.size(), "%s: output count", what);
    for (size_t i = 0; i < w.size() && i < g.size(); i++) expect_close(g[i], w[i], atol, rtol, what);
  };
  both(Op::ADD, {&x, &y}, {&gx, &gy}, {}, 0, 0, "add");
  both(Op::GELU, {&x}, {&gx}, {}, 1e-7, 4e-6, "gelu");
  both(Op::SUM, {&x}, {&gx}, {1}, 1e-6, 1e-6, "sum");
  both(Op::ARGMAX, {&x}, {&gx}, {2}, 0, 0, "argmax");
  both(Op::SOFTMAX, {&x}, {&gx}, {-1}, 1e-7, 2e-6, "softmax");
  both(Op::RMSNORM, {&x, nullptr}, {&gx, nullptr}, {1e-6}, 1e-7, 1e-6, "rmsnorm");
  both(Op::TOPK, {&x}, {&gx}, {3}, 0, 0, "topk");
  // matmul: batched with broadcasting, a 1-D operand, a transposed weight and a bias
  Tensor w = host_random({8, 5}, DType::BF16), b = host_random({5}, DType::F32);
  Tensor gw = nx::to_device(w, 0), gb = nx::to_device(b, 0);
  both(Op::MATMUL, {&x, &w, &b}, {&gx, &gw, &gb}, {}, 2e-5, 1e-5, "matmul batched + bias");
  Tensor v8 = host_random({8}, DType::F32), gv8 = nx::to_device(v8, 0);
  both(Op::MATMUL, {&v8, &w}, {&gv8, &gw}, {}, 2e-5, 1e-5, "matmul 1-D a");
  Tensor wt = host_random({5, 8}, DType::F32), gwt = nx::to_device(wt, 0);
  Tensor wtv = wt.view({8, 5}, {1, 8}, 0), gwtv = gwt.view({8, 5}, {1, 8}, 0);
  both(Op::MATMUL, {&x, &wtv}, {&gx, &gwtv}, {}, 2e-5, 1e-5, "matmul transposed weight");
  // attention with a mask: the output is the [B, H, T, D] view of a [B, T, H, D] buffer on both
  Tensor q = host_random({1, 4, 3, 8}, DType::F32), k = host_random({1, 2, 5, 8}, DType::F32), vv = host_random({1, 2, 5, 8}, DType::F32);
  Tensor m = host_random({1, 5}, DType::I32, 1, 1);
  Tensor gq = nx::to_device(q, 0), gk = nx::to_device(k, 0), gvv = nx::to_device(vv, 0), gm = nx::to_device(m, 0);
  both(Op::ATTENTION, {&q, &k, &vv, &m}, {&gq, &gk, &gvv, &gm}, {0.35}, 5e-5, 1e-4, "attention");
  // in place: fill_ / copy_ / scatter_ return their first input (same storage, same device)
  Tensor gz = nx::to_device(host_random({2, 3, 8}, DType::F32), 0);
  auto r = nx::run_op(Op::COPY_, {&gz, &gx}, {});
  NXC_EXPECT(r[0].storage == gz.storage, "copy_ returns its target");
  NXC_EXPECT(values(gz) == values(x), "copy_ copied");
  nx::run_op(Op::FILL_, {&gz}, {2.5});
  NXC_EXPECT(values(gz) == std::vector<float>(48, 2.5f), "fill_");
  // randn_: the same values as on the CPU for the same seed (one generator, on the host)
  Tensor hr = Tensor::empty({4, 9}, DType::F32, true);
  Tensor gr = nx::to_device(hr, 0);
  nx::run_op(Op::RANDN_, {&hr}, {7, 0.5, 2});
  nx::run_op(Op::RANDN_, {&gr}, {7, 0.5, 2});
  NXC_EXPECT(values(gr) == values(hr), "randn_ matches the CPU");
  // errors: the same checks as the CPU (a shape error), and mixed devices
  const std::string ws = nxc::expect_error([&] { nx::run_op(Op::ADD, {&x, &w}, {}); }, "SHAPE", "cpu add shapes");
  const std::string gs = nxc::expect_error([&] { nx::run_op(Op::ADD, {&gx, &gw}, {}); }, "SHAPE", "cuda add shapes");
  NXC_EXPECT(ws == gs, "same message: '%s' vs '%s'", ws.c_str(), gs.c_str());
  const std::string mixed = nxc::expect_error([&] { nx::run_op(Op::ADD, {&x, &gy}, {}); }, "DEVICE", "mixed devices");
  NXC_EXPECT(mixed.find("cpu") != std::string::npos && mixed.find("cuda:0") != std::string::npos, "names both devices: %s",
             mixed.c_str());
  // an index error on the device poisons the output like on the CPU
  Tensor emb = nx::to_device(host_random({4, 3}, DType::F32), 0);
  Tensor ids = host_random({2}, DType::I64, 7, 7), gids = nx::to_device(ids, 0);
  auto bad = nx::run_op(Op::EMBEDDING, {&emb, &gids}, {});
  nx::executor().sync();
  auto e = bad[0].storage->get_error();
  NXC_EXPECT(e && e->code == "INDEX", "embedding with a bad id: INDEX on the output");
}
