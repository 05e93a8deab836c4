// elementwise_test.cpp: nx::cuda binary / unary / cast / fill / where against nx::ref (kernels/cpu/elementwise.h)
// on odd shapes, size 0 and 1, broadcast (stride 0), transposed and strided views, every dtype.
#include <string>
#include <vector>

#include "../../kernels/cpu/elementwise.h"
#include "../../kernels/cuda/cuda.h"
#include "../../native/src/core/ops.h"  // promote_types: the output dtypes ops.cpp gives
#include "harness.h"

using nx::BinaryOp;
using nx::DType;
using nx::UnaryOp;
using nxc::Layout;

namespace {

const DType kAll[] = {DType::F32, DType::F16, DType::BF16, DType::I32, DType::I64, DType::BOOL};
const std::vector<std::vector<int64_t>> kShapes = {{1}, {7}, {3, 5}, {2, 3, 33}, {0, 4}, {129, 67}, {2, 1, 3, 1, 5}};
const char* kBinNames[] = {"add", "sub", "mul", "div", "pow", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge"};
const char* kUnNames[] = {"neg", "abs", "exp", "log", "sqrt", "rsqrt", "relu", "gelu_tanh", "gelu", "silu", "tanh", "sigmoid",
                          "sin", "cos", "square", "reciprocal"};

DType binary_out(BinaryOp op, DType a, DType b) {  // as ops.cpp
  DType o = nx::promote_types(a, b);
  if (op >= BinaryOp::EQ) return DType::BOOL;
  if ((op == BinaryOp::DIV || op == BinaryOp::POW) && !nx::dtype_is_float(o)) return DType::F32;
  if (o == DType::BOOL) return DType::I64;
  return o;
}

std::string label(const char* op, DType a, DType b, const std::vector<int64_t>& shape, Layout l) {
  std::string s = std::string(op) + " " + nx::dtype_name(a) + "," + nx::dtype_name(b) + " [";
  for (size_t i = 0; i < shape.size(); i++) s += (i ? "," : "") + std::to_string(shape[i]);
  return s + "] " + nxc::layout_name(l);
}

}  // namespace

NXC_TEST(cuda_binary_vs_ref) {
  for (int opi = 0; opi <= static_cast<int>(BinaryOp::GE); opi++) {
    const BinaryOp op = static_cast<BinaryOp>(opi);
    for (const auto& shape : kShapes) {
      for (DType da : kAll) {
        // every dtype against f32 and against itself, so int/bool/float mixes all occur
        for (DType db : {DType::F32, da}) {
          const Layout la = nxc::kLayouts[nxc::rand_int(0, 2)], lb = nxc::kLayouts[nxc::rand_int(0, 2)];
          const bool int_math = !nx::dtype_is_float(da) && !nx::dtype_is_float(db);
          auto fill_a = [&](nxc::Buf& buf) {
            if (op == BinaryOp::POW) nxc::fill_random(buf, int_math ? -3 : 0.1, 3);
            else if (op == BinaryOp::DIV && int_math) nxc::fill_random(buf, -50, 50);
            else nxc::fill_random(buf, -3, 3);
          };
          auto a = nxc::make(shape, da, la), b = nxc::make(shape, db, lb);
          fill_a(*a);
          if (op == BinaryOp::POW) nxc::fill_random(*b, int_math ? 0 : -2, int_math ? 5 : 2);
          else if (op == BinaryOp::DIV && int_math) nxc::fill_random(*b, 1, 7);  // no zero divisors (own case)
          else nxc::fill_random(*b, -3, 3);
          const DType od = binary_out(op, da, db);
          auto want = nxc::make(shape, od, nxc::kLayouts[nxc::rand_int(0, 2)]);
          auto got = nxc::clone(*want);
          // half of the 2-D cases: `a` is a [1, N] row broadcast over dim 0 (stride 0), as ops receive it
          nx::KView ah = a->h, ad = a->d;
          if (shape.size() == 2 && nxc::rand_int(0, 1)) {
            a = nxc::make({1, shape[1]}, da, la);
            fill_a(*a);
            ah = nxc::broadcast(a->h, 0, shape[0]);
            ad = nxc::broadcast(a->d, 0, shape[0]);
          }
          nx::ref::binary(op, ah, b->h, want->h);
          nx::cuda::binary(op, ad, b->d, got->d);
          // Tolerance: + - * / on f32 values are correctly rounded in f32, which equals the reference's
          // double result rounded once (53 >= 2*24 + 2 bits: double rounding is innocuous), and narrow
          // outputs round that f32 the same way: exact. pow is computed in double on both sides (libm
          // vs CUDA's pow may differ by 1 ulp of double): 1 f32 ulp, plus one ulp of a narrow output.
          // max / min / comparisons / integer math: exact.
          const double rtol = op == BinaryOp::POW ? nxc::ulp1(DType::F32) + nxc::ulp1(od) : 0.0;
          nxc::allclose(*got, *want, 0.0, rtol, label(kBinNames[opi], da, db, shape, la));
        }
      }
    }
  }
}

NXC_TEST(cuda_binary_nan_and_int_errors) {
  // NaN propagation in maximum / minimum and comparisons with NaN (exact)
  auto a = nxc::make({4}, DType::F32), b = nxc::make({4}, DType::F32);
  nxc::fill_random(*a);
  nxc::fill_random(*b);
  nxc::set_f(*a, 1, NAN);
  nxc::set_f(*b, 2, NAN);
  for (BinaryOp op : {BinaryOp::MAXIMUM, BinaryOp::MINIMUM, BinaryOp::EQ, BinaryOp::NE, BinaryOp::LT}) {
    const DType od = op >= BinaryOp::EQ ? DType::BOOL : DType::F32;
    auto want = nxc::make({4}, od), got = nxc::clone(*want);
    nx::ref::binary(op, a->h, b->h, want->h);
    nx::cuda::binary(op, a->d, b->d, got->d);
    nxc::allclose(*got, *want, 0, 0, std::string("nan ") + kBinNames[static_cast<int>(op)]);
  }
  // integer division by zero and negative powers: BAD_INPUT with the reference's message
  auto x = nxc::make({5}, DType::I64), y = nxc::make({5}, DType::I64);
  nxc::fill_random(*x, 1, 9);
  nxc::fill_random(*y, 1, 3);
  nxc::set_f(*y, 3, 0);
  auto o = nxc::make({5}, DType::I64);
  std::string want = nxc::expect_error([&] { nx::ref::binary(BinaryOp::DIV, x->h, y->h, o->h); }, "BAD_INPUT", "ref div by 0");
  std::string got = nxc::expect_error([&] { nx::cuda::binary(BinaryOp::DIV, x->d, y->d, o->d); }, "BAD_INPUT", "cuda div by 0");
  NXC_EXPECT(got == want, "message '%s' vs '%s'", got.c_str(), want.c_str());
  nxc::set_f(*y, 3, -1);
  nxc::set_f(*y, 1, -2);
  want = nxc::expect_error([&] { nx::ref::binary(BinaryOp::POW, x->h, y->h, o->h); }, "BAD_INPUT", "ref pow < 0");
  got = nxc::expect_error([&] { nx::cuda::binary(BinaryOp::POW, x->d, y->d, o->d); }, "BAD_INPUT", "cuda pow < 0");
  NXC_EXPECT(got == want, "message '%s' vs '%s'", got.c_str(), want.c_str());
  // INT64_MIN / -1 wraps (as the reference)
  auto m = nxc::make({1}, DType::I64), mo = nxc::make({1}, DType::I64);
  nx::store_i64(m->h.data, DType::I64, 0, INT64_MIN);
  m->upload();
  auto neg1 = nxc::make({1}, DType::I64);
  nx::store_i64(neg1->h.data, DType::I64, 0, -1);
  neg1->upload();
  auto mo2 = nxc::clone(*mo);
  nx::ref::binary(BinaryOp::DIV, m->h, neg1->h, mo->h);
  nx::cuda::binary(BinaryOp::DIV, m->d, neg1->d, mo2->d);
  nxc::allclose(*mo2, *mo, 0, 0, "INT64_MIN / -1");
}

NXC_TEST(cuda_unary_vs_ref) {
  for (int opi = 0; opi <= static_cast<int>(UnaryOp::RECIPROCAL); opi++) {
    const UnaryOp op = static_cast<UnaryOp>(opi);
    const bool keeps_int = op == UnaryOp::NEG || op == UnaryOp::ABS || op == UnaryOp::RELU || op == UnaryOp::SQUARE;
    const bool positive = op == UnaryOp::LOG || op == UnaryOp::SQRT || op == UnaryOp::RSQRT;
    for (const auto& shape : kShapes) {
      for (DType dx : kAll) {
        const DType od = nx::dtype_is_float(dx) ? dx : (keeps_int && dx != DType::BOOL ? dx : DType::F32);
        const Layout lx = nxc::kLayouts[nxc::rand_int(0, 2)];
        auto x = nxc::make(shape, dx, lx);
        nxc::fill_random(*x, positive ? 0.05 : -4, 4);
        auto want = nxc::make(shape, od, nxc::kLayouts[nxc::rand_int(0, 2)]);
        auto got = nxc::clone(*want);
        nx::ref::unary(op, x->h, want->h);
        nx::cuda::unary(op, x->d, got->d);
        // Tolerance. Exact: neg, abs, relu, square, sqrt, reciprocal (correctly rounded f32 = the
        // reference's double rounded once), rsqrt (computed in double on both sides), integer math.
        // The rest use CUDA's f32 libdevice functions where the reference uses double: expf / logf /
        // sinf / cosf / tanhf are within 2 ulp (CUDA C Programming Guide, "Mathematical Functions"),
        // erfcf within 4 ulp; sigmoid / silu / gelu add a division and a product (about 2 ulp more),
        // and gelu_tanh's f32 argument u = c (x + 0.044715 x^3) carries ~2 ulp, amplified by |2u| <= 10
        // through exp: 4e-6 relative with a 1e-7 absolute floor for results near zero (sin / tanh /
        // gelu around their zeros). Narrow outputs: plus one ulp of the output dtype.
        const bool exact = keeps_int || op == UnaryOp::SQRT || op == UnaryOp::RECIPROCAL || op == UnaryOp::RSQRT;
        const double rtol = exact ? 0.0 : 4e-6 + nxc::ulp1(od);
        const double atol = exact ? 0.0 : 1e-7;
        nxc::allclose(*got, *want, atol, rtol, label(kUnNames[opi], dx, od, shape, lx));
      }
    }
  }
}

NXC_TEST(cuda_cast_fill_where_vs_ref) {
  // cast between every pair of dtypes and layouts: the same conversions on both sides (exact)
  for (const auto& shape : kShapes) {
    for (DType dx : kAll) {
      for (DType dout : kAll) {
        const Layout lx = nxc::kLayouts[nxc::rand_int(0, 2)], lo = nxc::kLayouts[nxc::rand_int(0, 2)];
        auto x = nxc::make(shape, dx, lx);
        nxc::fill_random(*x, -300, 300);  // past f16/bf16 precision and int8 ranges, inside every dtype
        auto want = nxc::make(shape, dout, lo), got = nxc::clone(*want);
        nx::ref::cast(x->h, want->h);
        nx::cuda::cast(x->d, got->d);
        nxc::allclose(*got, *want, 0, 0, label("cast", dx, dout, shape, lx) + " -> " + nxc::layout_name(lo));
      }
    }
  }
  // cast of special values (NaN, inf, f16 subnormals and overflow, bf16 rounding ties)
  const float specials[] = {NAN, INFINITY, -INFINITY, 65519.0f, 65520.0f, 1e-7f, -3e-8f, 6.1e-5f, 1.00390625f, 1.01171875f, -0.0f, 0.0f};
  auto sx = nxc::make({12}, DType::F32);
  for (int i = 0; i < 12; i++) nx::store_f32(sx->h.data, DType::F32, i, specials[i]);
  sx->upload();
  for (DType dout : {DType::F16, DType::BF16}) {
    auto want = nxc::make({12}, dout), got = nxc::clone(*want);
    nx::ref::cast(sx->h, want->h);
    nx::cuda::cast(sx->d, got->d);
    nxc::allclose(*got, *want, 0, 0, std::string("cast specials -> ") + nx::dtype_name(dout));
  }
  // fill: the element bytes are made by the reference's conversions (exact)
  for (const auto& shape : kShapes) {
    for (DType dout : kAll) {
      for (double v : {0.0, 1.0, -2.5, 0.1, 70000.0, 3e9}) {
        auto want = nxc::make(shape, dout, nxc::kLayouts[nxc::rand_int(0, 2)]), got = nxc::clone(*want);
        nx::ref::fill(want->h, v);
        nx::cuda::fill(got->d, v);
        nxc::allclose(*got, *want, 0, 0, label("fill", dout, dout, shape, nxc::Layout::Contiguous) + " " + std::to_string(v));
      }
    }
  }
  // where: cond bool or int, branches of mixed dtypes (exact)
  for (const auto& shape : kShapes) {
    for (DType dc : {DType::BOOL, DType::I32}) {
      for (DType da : kAll) {
        const DType db = nxc::rand_int(0, 1) ? da : DType::F32;
        auto c = nxc::make(shape, dc, nxc::kLayouts[nxc::rand_int(0, 2)]);
        auto a = nxc::make(shape, da, nxc::kLayouts[nxc::rand_int(0, 2)]);
        auto b = nxc::make(shape, db, nxc::kLayouts[nxc::rand_int(0, 2)]);
        nxc::fill_random(*c, dc == DType::BOOL ? 0 : -1, 1);
        nxc::fill_random(*a, -9, 9);
        nxc::fill_random(*b, -9, 9);
        const DType od = nx::promote_types(da, db);
        auto want = nxc::make(shape, od, nxc::kLayouts[nxc::rand_int(0, 2)]), got = nxc::clone(*want);
        nx::ref::where(c->h, a->h, b->h, want->h);
        nx::cuda::where(c->d, a->d, b->d, got->d);
        nxc::allclose(*got, *want, 0, 0, label("where", da, db, shape, nxc::Layout::Contiguous));
      }
    }
  }
}
