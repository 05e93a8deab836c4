// norm_test.cpp: nx::fast rmsnorm / layernorm against nx::ref, and nx::ref against hand-computed
// values and the defining properties (unit RMS, zero mean / unit variance).
//
// Run: g++ -O3 -std=c++17 -march=native -I. test/cpp/harness.cpp test/cpp/norm_test.cpp
//        kernels/cpu/norm.cpp native/src/core/threadpool.cpp -lpthread -o /tmp/nm && /tmp/nm
#include <cstring>

#include "../../kernels/cpu/norm.h"
#include "harness.h"

using nx::DType;
using nxt::Layout;

namespace {
const DType kFloatTypes[] = {DType::F32, DType::F16, DType::BF16};
const Layout kLayouts[] = {Layout::Contiguous, Layout::Transposed, Layout::Strided};
double one_ulp(DType t) { return t == DType::F16 ? 1.0 / 1024 : t == DType::BF16 ? 1.0 / 128 : 0.0; }
std::shared_ptr<nxt::Buf> vec_f32(const std::vector<float>& v) {
  auto b = nxt::make({static_cast<int64_t>(v.size())}, DType::F32);
  std::memcpy(b->v.data, v.data(), v.size() * 4);
  return b;
}
}  // namespace

NX_TEST(nm_ref_known_values) {
  // rmsnorm([3, 4]), eps 0: mean(x^2) = 12.5 -> x / sqrt(12.5); weight [2, 0.5]
  auto x = vec_f32({3, 4}), w = vec_f32({2, 0.5f});
  auto o = nxt::make({2}, DType::F32);
  nx::ref::rmsnorm(x->v, &w->v, 0.0f, o->v);
  const float* ov = o->v.ptr<float>();
  // one rounding from double: half an f32 ulp (6e-8 relative)
  NX_EXPECT(std::fabs(ov[0] - 1.6970562748477141) <= 6e-8 * 1.7 && std::fabs(ov[1] - 0.56568542494923802) <= 6e-8 * 0.6,
            "rmsnorm %.9g %.9g", ov[0], ov[1]);
  nx::ref::rmsnorm(x->v, nullptr, 0.0f, o->v);
  NX_EXPECT(std::fabs(ov[0] - 0.84852813742385702) <= 6e-8, "rmsnorm no weight %.9g", ov[0]);
  // eps: rmsnorm([0, 0]) = 0 (not NaN) with eps > 0
  auto z = vec_f32({0, 0});
  nx::ref::rmsnorm(z->v, nullptr, 1e-6f, o->v);
  NX_EXPECT(ov[0] == 0 && ov[1] == 0, "rmsnorm of zeros");
  // layernorm([1, 2, 3, 4]), eps 0: mean 2.5, var 1.25; weight 2, bias 1
  auto l = vec_f32({1, 2, 3, 4}), lw = vec_f32({2, 2, 2, 2}), lb = vec_f32({1, 1, 1, 1});
  auto lo = nxt::make({4}, DType::F32);
  nx::ref::layernorm(l->v, &lw->v, &lb->v, 0.0f, lo->v);
  const double want[4] = {-1.6832815729997477, 0.10557280900008412, 1.8944271909999159, 3.6832815729997477};
  for (int i = 0; i < 4; i++)
    NX_EXPECT(std::fabs(lo->v.ptr<float>()[i] - want[i]) <= 6e-8 * std::fabs(want[i]), "layernorm[%d] %.9g", i,
              lo->v.ptr<float>()[i]);
}

NX_TEST(nm_ref_properties) {
  // Without weight/bias: layernorm rows have mean 0 and variance 1 - eps-ish; rmsnorm rows have
  // mean square 1. Checked in double on the f32 outputs: f32 rounding of D outputs bounds both
  // statistics' error by ~1e-6 (tolerance 1e-5 adds eps = 1e-5's effect on the variance).
  auto x = nxt::make({9, 300}, DType::F32, Layout::Transposed);
  nxt::fill_random(x->v, -3, 5);
  auto o = nxt::make({9, 300}, DType::F32);
  nx::ref::layernorm(x->v, nullptr, nullptr, 1e-5f, o->v);
  auto v = nxt::to_f32(o->v);
  for (int r = 0; r < 9; r++) {
    double m = 0, s = 0;
    for (int i = 0; i < 300; i++) m += v[r * 300 + i];
    m /= 300;
    for (int i = 0; i < 300; i++) s += (v[r * 300 + i] - m) * (v[r * 300 + i] - m);
    s /= 300;
    NX_EXPECT(std::fabs(m) < 1e-5 && std::fabs(s - 1) < 1e-4, "layernorm row %d mean %.3g var %.9g", r, m, s);
  }
  nx::ref::rmsnorm(x->v, nullptr, 1e-6f, o->v);
  v = nxt::to_f32(o->v);
  for (int r = 0; r < 9; r++) {
    double ms = 0;
    for (int i = 0; i < 300; i++) ms += static_cast<double>(v[r * 300 + i]) * v[r * 300 + i];
    ms /= 300;
    NX_EXPECT(std::fabs(ms - 1) < 1e-5, "rmsnorm row %d mean square %.9g", r, ms);
  }
}

NX_TEST(nm_fast_vs_ref) {
  const std::vector<std::vector<int64_t>> shapes = {
      {1}, {7}, {3, 5}, {128, 768}, {256, 4096}, {4, 1, 37}, {2, 3, 4, 65}, {0, 8}, {5, 1}, {3, 1000}};
  const int wkinds = 4;  // none, f32, bf16, f16
  for (const auto& shape : shapes) {
    int64_t D = shape.back(), total = 1;
    for (auto s : shape) total *= s;
    for (DType dx : kFloatTypes) {
      for (DType dout : kFloatTypes) {
        for (int wk = 0; wk < wkinds; wk++) {
          if (total > 100000 && (dx != dout || wk == 3)) continue;
          // last dim contiguous most of the time (the fast path); other layouts take the fallback
          Layout lx = nxt::rand_int(0, 3) ? Layout::Contiguous : kLayouts[nxt::rand_int(1, 2)];
          auto x = nxt::make(shape, dx, lx);
          nxt::fill_random(x->v, -2, 3);
          std::shared_ptr<nxt::Buf> w, b;
          if (wk) {
            DType wd = wk == 1 ? DType::F32 : wk == 2 ? DType::BF16 : DType::F16;
            w = nxt::make({D}, wd, nxt::rand_int(0, 3) ? Layout::Contiguous : Layout::Strided);
            b = nxt::make({D}, wd);
            nxt::fill_random(w->v, 0.5, 1.5);
            nxt::fill_random(b->v, -1, 1);
          }
          Layout lo = nxt::rand_int(0, 3) ? Layout::Contiguous : Layout::Strided;
          for (int kind = 0; kind < 2; kind++) {
            auto o1 = nxt::make(shape, dout, lo), o2 = nxt::make(shape, dout, lo);
            const nx::KView* wp = w ? &w->v : nullptr;
            const nx::KView* bp = b ? &b->v : nullptr;
            if (kind == 0) {
              nx::fast::rmsnorm(x->v, wp, 1e-6f, o1->v);
              nx::ref::rmsnorm(x->v, wp, 1e-6f, o2->v);
            } else {
              nx::fast::layernorm(x->v, wp, bp, 1e-5f, o1->v);
              nx::ref::layernorm(x->v, wp, bp, 1e-5f, o2->v);
            }
            // Tolerance: the sum of squares runs in 64 f32 lanes (error <= (D/64 + 6) ulp of the
            // sum, halved by the sqrt), the output takes 2-3 f32 roundings: rtol 1e-6 + D * 1e-9.
            // layernorm's x - mean in f32 is off by up to an ulp of |x| (<= 3 here) -> atol 1e-6.
            // Narrow outputs: one ulp of the output more (and f16's absolute subnormal ulp, 6e-8).
            double rtol = 1e-6 + static_cast<double>(D) * 1e-9 + one_ulp(dout);
            double atol = 1e-6 + (dout == DType::F16 ? 6e-8 : 0);
            char buf[128];
            std::snprintf(buf, sizeof buf, "%s x %s w %d out %s D %lld", kind ? "layernorm" : "rmsnorm",
                          nx::dtype_name(dx), wk, nx::dtype_name(dout), static_cast<long long>(D));
            nxt::allclose(o1->v, o2->v, atol, rtol, buf);
          }
        }
      }
    }
  }
}
