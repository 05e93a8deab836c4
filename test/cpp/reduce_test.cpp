// reduce_test.cpp: nx::fast reduce / cumsum / softmax against nx::ref, and nx::ref against
// hand-computed values.
//
// Run: g++ -O3 -std=c++17 -march=native -I. test/cpp/harness.cpp test/cpp/reduce_test.cpp
//        kernels/cpu/reduce.cpp native/src/core/threadpool.cpp -lpthread -o /tmp/rd && /tmp/rd
#include <cstring>
#include <limits>

#include "../../kernels/cpu/reduce.h"
#include "harness.h"

using nx::DType;
using nx::ReduceOp;
using nxt::Layout;

namespace {

const DType kFloatTypes[] = {DType::F32, DType::F16, DType::BF16};
const Layout kLayouts[] = {Layout::Contiguous, Layout::Transposed, Layout::Strided};
const char* rop_name(ReduceOp op) {
  static const char* n[] = {"sum", "mean", "max", "min", "prod", "argmax", "argmin"};
  return n[static_cast<int>(op)];
}
double one_ulp(DType t) {
  return t == DType::F16 ? 1.0 / 1024 : t == DType::BF16 ? 1.0 / 128 : 0.0;
}
std::shared_ptr<nxt::Buf> vec_f32(const std::vector<float>& v) {
  auto b = nxt::make({static_cast<int64_t>(v.size())}, DType::F32);
  std::memcpy(b->v.data, v.data(), v.size() * 4);
  return b;
}
std::vector<int64_t> reduced(std::vector<int64_t> s, int dim) {
  if (!s.empty()) s[dim] = 1;
  return s;
}

const std::vector<std::vector<int64_t>> kShapes = {
    {}, {1}, {7}, {1000}, {3, 5}, {17, 600}, {4, 1, 37}, {2, 3, 4, 5}, {64, 2000}, {1030, 3}, {5, 0},
};

}  // namespace

NX_TEST(rd_ref_known_values) {
  auto x = vec_f32({3, -1, 7, 7, 2});
  auto o = nxt::make({1}, DType::F32), oi = nxt::make({1}, DType::I64);
  auto run = [&](ReduceOp op) {
    bool arg = op == ReduceOp::ARGMAX || op == ReduceOp::ARGMIN;
    nx::ref::reduce(op, x->v, 0, arg ? oi->v : o->v);
    return arg ? static_cast<double>(oi->v.ptr<int64_t>()[0]) : o->v.ptr<float>()[0];
  };
  NX_EXPECT(run(ReduceOp::SUM) == 18, "sum");
  NX_EXPECT(run(ReduceOp::MEAN) == 3.6f, "mean");
  NX_EXPECT(run(ReduceOp::MAX) == 7 && run(ReduceOp::MIN) == -1, "max/min");
  NX_EXPECT(run(ReduceOp::PROD) == -294, "prod");
  NX_EXPECT(run(ReduceOp::ARGMAX) == 2, "argmax: first of the tied 7s");
  NX_EXPECT(run(ReduceOp::ARGMIN) == 1, "argmin");
  x->v.ptr<float>()[3] = NAN;
  NX_EXPECT(std::isnan(run(ReduceOp::MAX)) && std::isnan(run(ReduceOp::MIN)), "NaN propagates in max/min");
  NX_EXPECT(run(ReduceOp::ARGMAX) == 3 && run(ReduceOp::ARGMIN) == 3, "NaN index wins argmax/argmin");
  // int64: exact beyond 2^53 (no float detour)
  auto xi = nxt::make({3}, DType::I64);
  int64_t iv[3] = {(int64_t{1} << 60) + 1, 2, -3};
  std::memcpy(xi->v.data, iv, 24);
  nx::ref::reduce(ReduceOp::SUM, xi->v, 0, oi->v);
  NX_EXPECT(oi->v.ptr<int64_t>()[0] == (int64_t{1} << 60), "int64 sum exact");
  // empty dim: sum 0, mean NaN, max throws
  auto e = nxt::make({0}, DType::F32);
  nx::ref::reduce(ReduceOp::SUM, e->v, 0, o->v);
  NX_EXPECT(o->v.ptr<float>()[0] == 0, "empty sum");
  nx::ref::reduce(ReduceOp::MEAN, e->v, 0, o->v);
  NX_EXPECT(std::isnan(o->v.ptr<float>()[0]), "empty mean is NaN");
  bool threw = false;
  try {
    nx::ref::reduce(ReduceOp::MAX, e->v, 0, o->v);
  } catch (const nx::Error& err) {
    threw = err.code == "BAD_INPUT";
  }
  NX_EXPECT(threw, "max of empty dim throws BAD_INPUT");
  // cumsum [1, 2, 3, 4] -> [1, 3, 6, 10]; along dim 0 of a 2x2
  auto c = vec_f32({1, 2, 3, 4});
  auto co = nxt::make({4}, DType::F32);
  nx::ref::cumsum(c->v, 0, co->v);
  const float* cv = co->v.ptr<float>();
  NX_EXPECT(cv[0] == 1 && cv[1] == 3 && cv[2] == 6 && cv[3] == 10, "cumsum");
  nx::KView c2 = c->v;
  c2.ndim = 2;
  c2.shape[0] = c2.shape[1] = 2;
  c2.strides[0] = 2;
  c2.strides[1] = 1;
  nx::KView co2 = co->v;
  co2.ndim = 2;
  co2.shape[0] = co2.shape[1] = 2;
  co2.strides[0] = 2;
  co2.strides[1] = 1;
  nx::ref::cumsum(c2, 0, co2);
  NX_EXPECT(cv[0] == 1 && cv[1] == 2 && cv[2] == 4 && cv[3] == 6, "cumsum dim 0");
  // softmax([1, 2, 3]) = e^x / sum, 20-digit values
  auto s = vec_f32({1, 2, 3});
  auto so = nxt::make({3}, DType::F32);
  nx::ref::softmax(s->v, 0, false, so->v);
  const double want[3] = {0.090030573170380462, 0.24472847105479764, 0.66524095577481772};
  for (int i = 0; i < 3; i++)
    NX_EXPECT(std::fabs(so->v.ptr<float>()[i] - want[i]) <= 6e-8 * want[i], "softmax[%d] = %.9g", i, so->v.ptr<float>()[i]);
  nx::ref::softmax(s->v, 0, true, so->v);
  for (int i = 0; i < 3; i++)
    NX_EXPECT(std::fabs(so->v.ptr<float>()[i] - std::log(want[i])) <= 1.2e-7 * std::fabs(std::log(want[i])), "log_softmax[%d]", i);
  // masked entries (-inf) get probability 0; a large offset does not overflow (max subtracted)
  auto m = vec_f32({1000, -INFINITY, 1000});
  nx::ref::softmax(m->v, 0, false, so->v);
  NX_EXPECT(so->v.ptr<float>()[0] == 0.5f && so->v.ptr<float>()[1] == 0 && so->v.ptr<float>()[2] == 0.5f, "masked softmax");
}

NX_TEST(rd_ref_softmax_rows_sum_to_one) {
  // Every row of ref softmax sums to 1 and exp(log_softmax) does too, along every dim.
  auto x = nxt::make({6, 7, 50}, DType::F32, Layout::Transposed);
  nxt::fill_random(x->v, -10, 10);
  for (int dim = 0; dim < 3; dim++) {
    for (bool lg : {false, true}) {
      auto o = nxt::make({6, 7, 50}, DType::F32);
      nx::ref::softmax(x->v, dim, lg, o->v);
      auto r = nxt::make(reduced({6, 7, 50}, dim), DType::F32);
      if (lg) {
        auto e = nxt::to_f32(o->v);
        for (size_t i = 0; i < e.size(); i++) o->v.ptr<float>()[i] = std::exp(e[i]);
      }
      nx::ref::reduce(ReduceOp::SUM, o->v, dim, r->v);
      // n f32-rounded terms of a sum of 1: |err| <= n * 2^-24 (+ exp's own error for log_softmax)
      double tol = 50 * 1.2e-7;
      for (float v : nxt::to_f32(r->v)) NX_EXPECT(std::fabs(v - 1.0) <= tol, "row sum %.9g (dim %d, log %d)", v, dim, lg);
    }
  }
}

NX_TEST(rd_fast_reduce) {
  const ReduceOp ops[] = {ReduceOp::SUM, ReduceOp::MEAN, ReduceOp::MAX, ReduceOp::MIN, ReduceOp::PROD,
                          ReduceOp::ARGMAX, ReduceOp::ARGMIN};
  for (const auto& shape : kShapes) {
    int nd = static_cast<int>(shape.size());
    for (int dim = 0; dim < std::max(nd, 1); dim++) {
      int64_t n = nd ? shape[dim] : 1, total = 1;
      for (auto s : shape) total *= s;
      for (ReduceOp op : ops) {
        if (n == 0 && op != ReduceOp::SUM && op != ReduceOp::MEAN && op != ReduceOp::PROD) continue;
        for (DType dt : {DType::F32, DType::F16, DType::BF16, DType::I32, DType::I64, DType::BOOL}) {
          if (total > 100000 && dt != DType::F32 && dt != DType::BF16) continue;
          bool arg = op == ReduceOp::ARGMAX || op == ReduceOp::ARGMIN;
          auto x = nxt::make(shape, dt, kLayouts[nxt::rand_int(0, 2)]);
          // prod of many values: keep them near 1 so the product stays finite
          if (op == ReduceOp::PROD) nxt::fill_random(x->v, dt == DType::F32 || dt == DType::F16 || dt == DType::BF16 ? 0.9 : 1, 1.1);
          else nxt::fill_random(x->v, -1, 1);
          // ints: mean into f32; bool: counts (sum / prod) into i64, like PyTorch
          DType odt = arg ? DType::I64 : (op == ReduceOp::MEAN && !nx::dtype_is_float(dt)) ? DType::F32 : dt;
          if (dt == DType::BOOL && (op == ReduceOp::SUM || op == ReduceOp::PROD)) odt = DType::I64;
          Layout lo = kLayouts[nxt::rand_int(0, 2)];
          auto o1 = nxt::make(reduced(shape, dim), odt, lo), o2 = nxt::make(reduced(shape, dim), odt, lo);
          int d = nd ? dim : 0;
          nx::fast::reduce(op, x->v, d, o1->v);
          nx::ref::reduce(op, x->v, d, o2->v);
          // Tolerance: max/min/argmax/argmin and integer math are exact. f32 sums: fast adds at
          // most ~64 terms in f32 before combining in double, so |err| <= ~64 * 2^-24 * sum|x|
          // <= 4e-6 * n for |x| <= 1 (mean: divided by n). prod: only ref is used (fast delegates).
          double atol = 0, rtol = 0;
          if (nx::dtype_is_float(dt)) {
            if (op == ReduceOp::SUM) atol = 4e-6 * static_cast<double>(n);
            if (op == ReduceOp::MEAN) atol = 4e-6;
            rtol = arg ? 0 : one_ulp(odt);  // a narrow output may round the other way
          }
          char buf[128];
          std::snprintf(buf, sizeof buf, "reduce %s %s dim %d of %dd", rop_name(op), nx::dtype_name(dt), d, nd);
          nxt::allclose(o1->v, o2->v, atol, rtol, buf);
        }
      }
    }
  }
  // NaN in a row / column: fast must agree with ref (NaN value, NaN index)
  for (int dim = 0; dim < 2; dim++) {
    auto x = nxt::make({40, 700}, DType::F32);
    nxt::fill_random(x->v);
    x->v.ptr<float>()[5 * 700 + 600] = NAN;
    x->v.ptr<float>()[9 * 700 + 3] = NAN;
    for (ReduceOp op : {ReduceOp::MAX, ReduceOp::MIN, ReduceOp::ARGMAX, ReduceOp::ARGMIN, ReduceOp::SUM}) {
      DType odt = (op == ReduceOp::ARGMAX || op == ReduceOp::ARGMIN) ? DType::I64 : DType::F32;
      auto o1 = nxt::make(reduced({40, 700}, dim), odt), o2 = nxt::make(reduced({40, 700}, dim), odt);
      nx::fast::reduce(op, x->v, dim, o1->v);
      nx::ref::reduce(op, x->v, dim, o2->v);
      nxt::allclose(o1->v, o2->v, op == ReduceOp::SUM ? 4e-6 * 700 : 0, 0, rop_name(op));
    }
  }
  // ties: bf16 storage of few distinct values, argmax must keep the first index
  auto t = nxt::make({8, 3000}, DType::BF16);
  nxt::fill_random(t->v, -3, 3);
  for (int i = 0; i < 8 * 3000; i++) t->v.ptr<uint16_t>()[i] = nx::f32_to_bf16(std::round(nx::bf16_to_f32(t->v.ptr<uint16_t>()[i])));
  for (ReduceOp op : {ReduceOp::ARGMAX, ReduceOp::ARGMIN}) {
    auto o1 = nxt::make({8, 1}, DType::I64), o2 = nxt::make({8, 1}, DType::I64);
    nx::fast::reduce(op, t->v, 1, o1->v);
    nx::ref::reduce(op, t->v, 1, o2->v);
    nxt::allclose(o1->v, o2->v, 0, 0, "argmax ties");  // exact index
  }
}

NX_TEST(rd_fast_cumsum) {
  for (const auto& shape : kShapes) {
    int nd = static_cast<int>(shape.size());
    for (int dim = 0; dim < std::max(nd, 1); dim++) {
      for (DType dt : {DType::F32, DType::F16, DType::BF16, DType::I32, DType::I64, DType::BOOL}) {
        auto x = nxt::make(shape, dt, kLayouts[nxt::rand_int(0, 2)]);
        nxt::fill_random(x->v, -1, 1);
        Layout lo = kLayouts[nxt::rand_int(0, 2)];
        DType odt = dt == DType::BOOL ? DType::I64 : dt;  // a running count
        auto o1 = nxt::make(shape, odt, lo), o2 = nxt::make(shape, odt, lo);
        nx::fast::cumsum(x->v, nd ? dim : 0, o1->v);
        nx::ref::cumsum(x->v, nd ? dim : 0, o2->v);
        // fast runs the same double running sum in the same order: exact
        nxt::allclose(o1->v, o2->v, 0, 0, "cumsum");
      }
    }
  }
}

NX_TEST(rd_fast_softmax) {
  const std::vector<std::vector<int64_t>> shapes = {
      {1}, {7}, {1000}, {3, 5}, {8 * 12, 128}, {17, 33}, {4, 1, 37}, {2, 3, 4, 5}, {64, 4097}, {3, 1}};
  for (const auto& shape : shapes) {
    int nd = static_cast<int>(shape.size());
    for (int dim = 0; dim < nd; dim++) {
      int64_t n = shape[dim];
      for (bool lg : {false, true}) {
        for (DType dt : kFloatTypes) {
          for (DType odt : kFloatTypes) {
            if (dt != odt && nxt::rand_int(0, 2)) continue;  // a sample of mixed pairs
            // last dim: mostly contiguous (the fast path); other layouts exercise the fallback
            Layout lx = dim == nd - 1 && nxt::rand_int(0, 2) ? Layout::Contiguous : kLayouts[nxt::rand_int(0, 2)];
            auto x = nxt::make(shape, dt, lx);
            nxt::fill_random(x->v, -12, 12);
            auto o1 = nxt::make(shape, odt), o2 = nxt::make(shape, odt);
            nx::fast::softmax(x->v, dim, lg, o1->v);
            nx::ref::softmax(x->v, dim, lg, o2->v);
            // Tolerance: x - max rounded in f32 (|x - max| <= 24 here: 24 * 2^-24 = 1.4e-6 relative
            // after exp), fast exp ~1 ulp, 32 f32 lane sums of n/32 positive terms (<= n/32 ulp of
            // the sum), 1/sum then a multiply (1 ulp): rtol 2e-6 + n/32 * 1.2e-7. log_softmax: the
            // sum's relative error becomes an absolute error of log(sum): atol of the same size.
            // Narrow outputs: one ulp more, and f16 subnormals (< 6.1e-5) have an absolute ulp 2^-24.
            double e = 2e-6 + static_cast<double>(n) / 32 * 1.2e-7;
            double atol = (lg ? e : 1e-30) + (odt == DType::F16 ? 6e-8 : 0), rtol = (lg ? 1.2e-7 : e) + one_ulp(odt);
            char buf[96];
            std::snprintf(buf, sizeof buf, "%s %s->%s dim %d n %lld", lg ? "log_softmax" : "softmax", nx::dtype_name(dt),
                          nx::dtype_name(odt), dim, static_cast<long long>(n));
            nxt::allclose(o1->v, o2->v, atol, rtol, buf);
          }
        }
      }
    }
  }
  // attention-style masked rows: -inf entries, a fully masked row (NaN in both), a NaN entry
  auto x = nxt::make({4, 70}, DType::F32);
  nxt::fill_random(x->v, -5, 5);
  float* p = x->v.ptr<float>();
  for (int j = 30; j < 70; j++) p[j] = -INFINITY;
  for (int j = 0; j < 70; j++) p[70 + j] = -INFINITY;
  p[2 * 70 + 17] = NAN;
  p[3 * 70 + 5] = 1e30f;
  for (bool lg : {false, true}) {
    auto o1 = nxt::make({4, 70}, DType::F32), o2 = nxt::make({4, 70}, DType::F32);
    nx::fast::softmax(x->v, 1, lg, o1->v);
    nx::ref::softmax(x->v, 1, lg, o2->v);
    nxt::allclose(o1->v, o2->v, 1e-6, 1e-6, "masked softmax");
  }
}
