// elementwise_test.cpp: nx::fast elementwise kernels against nx::ref, and nx::ref (plus common.h's
// f16/bf16 conversions) against hand-computed values.
//
// Run: g++ -O3 -std=c++17 -march=native -I. test/cpp/harness.cpp test/cpp/elementwise_test.cpp
//        kernels/cpu/elementwise.cpp native/src/core/threadpool.cpp -lpthread -o /tmp/ew && /tmp/ew
// (also build without -march=native: the scalar fallbacks must pass the same checks).
#include <cinttypes>
#include <cstring>
#include <limits>

#include "../../kernels/cpu/elementwise.h"
#include "harness.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

using nx::BinaryOp;
using nx::DType;
using nx::UnaryOp;
using nxt::Layout;

namespace {

const DType kFloatTypes[] = {DType::F32, DType::F16, DType::BF16};
const DType kAllTypes[] = {DType::F32, DType::F16, DType::BF16, DType::I32, DType::I64, DType::BOOL};
const Layout kLayouts[] = {Layout::Contiguous, Layout::Transposed, Layout::Strided};

// Relative size of one unit in the last place of a storage dtype (0 for f32 paths that are exact).
double one_ulp(DType t) {
  switch (t) {
    case DType::F16: return 1.0 / 1024;  // 10 mantissa bits
    case DType::BF16: return 1.0 / 128;  // 7 mantissa bits
    default: return 0;
  }
}

// A view of `shape` whose dims listed in bcast are expanded from size 1 (stride 0).
std::shared_ptr<nxt::Buf> make_bcast(const std::vector<int64_t>& shape, const std::vector<int>& bcast, DType dt,
                                     Layout layout, double lo = -1, double hi = 1) {
  std::vector<int64_t> small(shape);
  for (int d : bcast) small[d] = 1;
  auto b = nxt::make(small, dt, layout);
  nxt::fill_random(b->v, lo, hi);
  for (int d : bcast) {
    b->v.shape[d] = shape[d];
    b->v.strides[d] = 0;
  }
  return b;
}

const std::vector<std::vector<int64_t>> kShapes = {
    {}, {1}, {7}, {33}, {1000}, {3, 5}, {17, 65}, {2, 3, 4, 5}, {4, 1, 37}, {300, 1000},
};

const char* bop_name(BinaryOp op) {
  static const char* n[] = {"add", "sub", "mul", "div", "pow", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge"};
  return n[static_cast<int>(op)];
}
const char* uop_name(UnaryOp op) {
  static const char* n[] = {"neg", "abs", "exp", "log", "sqrt", "rsqrt", "relu", "gelu_tanh", "gelu_erf",
                            "silu", "tanh", "sigmoid", "sin", "cos", "square", "reciprocal"};
  return n[static_cast<int>(op)];
}

// Runs fast and ref into two fresh outputs of the same layout and compares them.
void check_binary(BinaryOp op, const nx::KView& a, const nx::KView& b, DType out_dt, Layout out_layout,
                  const std::vector<int64_t>& shape, const char* what) {
  auto o1 = nxt::make(shape, out_dt, out_layout), o2 = nxt::make(shape, out_dt, out_layout);
  nx::fast::binary(op, a, b, o1->v);
  nx::ref::binary(op, a, b, o2->v);
  // Tolerance: add/sub/mul/div/max/min/compare are correctly rounded in f32, and ref's double result
  // rounds to the same f32, so they must agree exactly (f16/bf16 outputs round that same f32).
  // pow: glibc powf is < 1 ulp, not correctly rounded: 2 f32 ulps, plus 1 ulp of a narrow output.
  double rtol = 0, atol = 0;
  if (op == BinaryOp::POW) {
    rtol = 2.4e-7 + one_ulp(out_dt);
    atol = 1e-30;
  }
  char buf[256];
  std::snprintf(buf, sizeof buf, "%s %s %s,%s->%s", what, bop_name(op), nx::dtype_name(a.dtype),
                nx::dtype_name(b.dtype), nx::dtype_name(out_dt));
  nxt::allclose(o1->v, o2->v, atol, rtol, buf);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// common.h conversions
// ---------------------------------------------------------------------------------------------
NX_TEST(ew_f16_bf16_known_bits) {
  // f32 -> f16, hand-computed bit patterns (IEEE binary16)
  struct { float f; uint16_t h; } f16[] = {
      {1.0f, 0x3c00}, {-2.0f, 0xc000}, {0.0f, 0x0000}, {-0.0f, 0x8000}, {65504.0f, 0x7bff},
      {65519.99f, 0x7bff},                       // just under the rounding boundary to inf
      {65520.0f, 0x7c00},                        // tie between 65504 (odd) and 2^16 -> even = inf
      {1e6f, 0x7c00}, {-1e6f, 0xfc00},
      {std::ldexp(1.0f, -14), 0x0400},           // smallest normal
      {std::ldexp(1.0f, -24), 0x0001},           // smallest subnormal
      {std::ldexp(1.0f, -25), 0x0000},           // tie 0 / 2^-24 -> even (0)
      {std::ldexp(1.5f, -25), 0x0001},           // above the tie -> rounds up
      {std::ldexp(3.0f, -25), 0x0002},           // tie 1 / 2 -> even (2)
      {std::ldexp(1023.0f, -24), 0x03ff},        // largest subnormal
      {1.0f + std::ldexp(1.0f, -11), 0x3c00},    // tie 1 / 1+2^-10 -> even (1)
      {1.0f + std::ldexp(3.0f, -11), 0x3c02},    // tie -> even (odd neighbour rounds up)
      {std::numeric_limits<float>::infinity(), 0x7c00}, {-std::numeric_limits<float>::infinity(), 0xfc00},
  };
  for (auto& c : f16) {
    uint16_t got = nx::f32_to_f16(c.f);
    NX_EXPECT(got == c.h, "f32_to_f16(%.9g) = 0x%04x, want 0x%04x", c.f, got, c.h);
  }
  uint16_t hn = nx::f32_to_f16(std::numeric_limits<float>::quiet_NaN());
  NX_EXPECT((hn & 0x7c00) == 0x7c00 && (hn & 0x03ff) != 0, "f32_to_f16(NaN) = 0x%04x is not a NaN", hn);
  // f32 -> bf16
  struct { uint32_t f; uint16_t h; } bf[] = {
      {0x3f800000u, 0x3f80},  // 1.0
      {0x3f808000u, 0x3f80},  // tie, even neighbour below
      {0x3f818000u, 0x3f82},  // tie, odd neighbour -> up
      {0x3f808001u, 0x3f81},  // just above the tie
      {0x7f7fffffu, 0x7f80},  // FLT_MAX rounds to inf
      {0x00010000u, 0x0001},  // subnormal kept (no flush to zero)
      {0x00008000u, 0x0000},  // tie -> even (0)
      {0x80000000u, 0x8000},  // -0
      {0x7f800000u, 0x7f80},  // inf
      {0x7f800001u, 0x7fc0},  // signalling NaN made quiet
  };
  for (auto& c : bf) {
    float f;
    std::memcpy(&f, &c.f, 4);
    uint16_t got = nx::f32_to_bf16(f);
    NX_EXPECT(got == c.h, "f32_to_bf16(0x%08x) = 0x%04x, want 0x%04x", c.f, got, c.h);
  }
  // f16 -> f32 known values, incl. subnormals
  NX_EXPECT(nx::f16_to_f32(0x0001) == std::ldexp(1.0f, -24), "f16 0x0001");
  NX_EXPECT(nx::f16_to_f32(0x0200) == std::ldexp(1.0f, -15), "f16 0x0200");
  NX_EXPECT(nx::f16_to_f32(0x83ff) == -std::ldexp(1023.0f, -24), "f16 0x83ff");
  NX_EXPECT(nx::f16_to_f32(0x7bff) == 65504.0f, "f16 0x7bff");
  NX_EXPECT(std::isinf(nx::f16_to_f32(0xfc00)) && nx::f16_to_f32(0xfc00) < 0, "f16 0xfc00");
  NX_EXPECT(std::isnan(nx::f16_to_f32(0x7e00)), "f16 0x7e00");
  NX_EXPECT(nx::bf16_to_f32(0x3f80) == 1.0f, "bf16 0x3f80");
}

NX_TEST(ew_f16_bf16_roundtrip_all) {
  // Every 16-bit pattern: widening then narrowing returns the same bits (NaNs: stay NaN).
  int bad16 = 0, badb = 0;
  for (uint32_t h = 0; h < 65536; h++) {
    uint16_t x = static_cast<uint16_t>(h);
    float f = nx::f16_to_f32(x);
    uint16_t back = nx::f32_to_f16(f);
    bool nan = (x & 0x7c00) == 0x7c00 && (x & 0x3ff);
    if (nan ? !(std::isnan(f) && (back & 0x7c00) == 0x7c00 && (back & 0x3ff)) : back != x) bad16++;
    float g = nx::bf16_to_f32(x);
    uint16_t backb = nx::f32_to_bf16(g);
    bool nanb = (x & 0x7f80) == 0x7f80 && (x & 0x7f);
    if (nanb ? !std::isnan(nx::bf16_to_f32(backb)) : backb != x) badb++;
  }
  NX_EXPECT(bad16 == 0, "%d f16 patterns do not round-trip", bad16);
  NX_EXPECT(badb == 0, "%d bf16 patterns do not round-trip", badb);
}

NX_TEST(ew_f16_matches_f16c) {
#if defined(__F16C__)
  // common.h's f32_to_f16 against the hardware conversion (vcvtps2ph, round to nearest even) on
  // every f16 value, both neighbours of every rounding midpoint, and 4M random bit patterns.
  // NaN: both must give a NaN; the payload may differ (common.h returns the canonical 0x7e00).
  auto hw = [](float f) { return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT)); };
  int64_t bad = 0, tried = 0, nan_payload = 0;
  auto check = [&](float f) {
    tried++;
    uint16_t s = nx::f32_to_f16(f), h = hw(f);
    if (std::isnan(f)) {
      bool ok = (s & 0x7c00) == 0x7c00 && (s & 0x3ff) && (h & 0x7c00) == 0x7c00 && (h & 0x3ff);
      if (!ok) bad++;
      if (s != h) nan_payload++;
      return;
    }
    if (s != h) {
      if (bad < 5) std::fprintf(stderr, "  f32_to_f16(%a) = 0x%04x, F16C 0x%04x\n", f, s, h);
      bad++;
    }
  };
  for (uint32_t h = 0; h < 65536; h++) {
    float f = nx::f16_to_f32(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    uint32_t u;
    std::memcpy(&u, &f, 4);
    uint32_t mid = u + (1u << 12);  // halfway to the next f16 (normal range; also probes above it)
    for (uint32_t v : {u, u + 1, u - 1, mid, mid - 1, mid + 1}) {
      float g;
      std::memcpy(&g, &v, 4);
      check(g);
    }
  }
  // subnormal-range midpoints: (k + 0.5) * 2^-24 and neighbours
  for (int k = 0; k < 1024; k++) {
    float m = std::ldexp(static_cast<float>(k) + 0.5f, -24);
    check(m);
    check(std::nextafter(m, 0.0f));
    check(std::nextafter(m, 1.0f));
  }
  for (int i = 0; i < (1 << 22); i++) {
    uint32_t v = static_cast<uint32_t>(nxt::rng()());
    float g;
    std::memcpy(&g, &v, 4);
    check(g);
  }
  std::printf("  f32_to_f16 vs F16C: %" PRId64 " values, %" PRId64 " mismatches, %" PRId64
              " NaNs with a different payload (allowed)\n", tried, bad, nan_payload);
  NX_EXPECT(bad == 0, "%" PRId64 " mismatches", bad);
#else
  std::printf("  (built without F16C: skipped)\n");
#endif
}

// ---------------------------------------------------------------------------------------------
// reference against hand-computed values
// ---------------------------------------------------------------------------------------------
namespace {
float ref_unary_1(UnaryOp op, float x) {
  auto in = nxt::make({1}, DType::F32), out = nxt::make({1}, DType::F32);
  in->v.ptr<float>()[0] = x;
  nx::ref::unary(op, in->v, out->v);
  return out->v.ptr<float>()[0];
}
}  // namespace

NX_TEST(ew_ref_known_values) {
  // x, gelu_tanh, gelu_erf, silu, sigmoid, tanh: 30-digit mpmath values.
  const double t[][6] = {
      {-3.0, -0.0036373920817730188, -0.0040496940948902836, -0.14227761953270034, 0.047425873177566781, -0.99505475368673045},
      {-1.0, -0.1588080093917233, -0.15865525393145705, -0.26894142136999512, 0.26894142136999512, -0.76159415595576489},
      {-0.5, -0.15428599017485608, -0.15426876936299345, -0.18877033439907272, 0.37754066879814544, -0.46211715726000976},
      {0.5, 0.34571400982514392, 0.34573123063700655, 0.31122966560092728, 0.62245933120185456, 0.46211715726000976},
      {1.0, 0.8411919906082767, 0.84134474606854295, 0.73105857863000488, 0.73105857863000488, 0.76159415595576489},
      {2.5, 2.4849157339100014, 2.4844758366855597, 2.3103545499468911, 0.92414181997875645, 0.98661429815143029},
  };
  const UnaryOp ops[] = {UnaryOp::GELU_TANH, UnaryOp::GELU_ERF, UnaryOp::SILU, UnaryOp::SIGMOID, UnaryOp::TANH};
  for (auto& row : t) {
    for (int k = 0; k < 5; k++) {
      float got = ref_unary_1(ops[k], static_cast<float>(row[0]));
      // ref evaluates in double and rounds once to f32: within half an f32 ulp (~6e-8 relative),
      // allowed 1.2e-7 for the double-precision libm error on top.
      double err = std::fabs(got - row[k + 1]) / std::fabs(row[k + 1]);
      NX_EXPECT(err <= 1.2e-7, "%s(%g) = %.9g, want %.17g", uop_name(ops[k]), row[0], got, row[k + 1]);
    }
  }
  NX_EXPECT(ref_unary_1(UnaryOp::EXP, 1.0f) == 2.71828182845904523536f, "exp(1)");
  NX_EXPECT(ref_unary_1(UnaryOp::RSQRT, 4.0f) == 0.5f, "rsqrt(4)");
  NX_EXPECT(ref_unary_1(UnaryOp::RELU, -2.0f) == 0.0f && ref_unary_1(UnaryOp::RELU, 3.0f) == 3.0f, "relu");
  NX_EXPECT(std::isnan(ref_unary_1(UnaryOp::RELU, NAN)), "relu(NaN) stays NaN");
  NX_EXPECT(ref_unary_1(UnaryOp::SIGMOID, -200.0f) == 0.0f && ref_unary_1(UnaryOp::SIGMOID, 200.0f) == 1.0f, "sigmoid tails");
  NX_EXPECT(ref_unary_1(UnaryOp::GELU_ERF, -20.0f) == 0.0f, "gelu_erf far tail is (-)0");
}

NX_TEST(ew_ref_integer_semantics) {
  auto bin_i = [](BinaryOp op, int64_t x, int64_t y, DType dt = DType::I64) {
    auto a = nxt::make({1}, dt), b = nxt::make({1}, dt), o = nxt::make({1}, DType::I64);
    nx::store_i64(a->v.data, dt, 0, x);
    nx::store_i64(b->v.data, dt, 0, y);
    nx::ref::binary(op, a->v, b->v, o->v);
    return o->v.ptr<int64_t>()[0];
  };
  NX_EXPECT(bin_i(BinaryOp::DIV, 7, -2) == -3, "7 / -2 truncates toward zero");
  NX_EXPECT(bin_i(BinaryOp::DIV, -7, 2) == -3, "-7 / 2 truncates toward zero");
  NX_EXPECT(bin_i(BinaryOp::DIV, INT64_MIN, -1) == INT64_MIN, "INT64_MIN / -1 wraps");
  NX_EXPECT(bin_i(BinaryOp::POW, 3, 4) == 81 && bin_i(BinaryOp::POW, -2, 3) == -8, "int pow");
  NX_EXPECT(bin_i(BinaryOp::ADD, INT64_MAX, 1) == INT64_MIN, "int64 add wraps");
  NX_EXPECT(bin_i(BinaryOp::ADD, 2147483647, 1, DType::I32) == 2147483648LL, "i32 inputs compute in int64");
  NX_EXPECT(bin_i(BinaryOp::MAXIMUM, -5, 3) == 3 && bin_i(BinaryOp::MINIMUM, -5, 3) == -5, "max/min");
  bool threw = false;
  try {
    bin_i(BinaryOp::DIV, 1, 0);
  } catch (const nx::Error& e) {
    threw = e.code == "BAD_INPUT";
  }
  NX_EXPECT(threw, "integer division by zero throws Error{BAD_INPUT}");
  // i64 beyond 2^24 keeps its value (no float detour)
  NX_EXPECT(bin_i(BinaryOp::SUB, (int64_t{1} << 40) + 1, 1) == (int64_t{1} << 40), "int64 exact");
  // comparisons write BOOL 0/1
  auto a = nxt::make({3}, DType::F32), b = nxt::make({3}, DType::F32), o = nxt::make({3}, DType::BOOL);
  float av[3] = {1, 2, NAN}, bv[3] = {2, 2, NAN};
  std::memcpy(a->v.data, av, 12);
  std::memcpy(b->v.data, bv, 12);
  nx::ref::binary(BinaryOp::LE, a->v, b->v, o->v);
  const uint8_t* r = o->v.ptr<uint8_t>();
  NX_EXPECT(r[0] == 1 && r[1] == 1 && r[2] == 0, "LE -> %d %d %d", r[0], r[1], r[2]);
  nx::ref::binary(BinaryOp::NE, a->v, b->v, o->v);
  NX_EXPECT(r[0] == 1 && r[1] == 0 && r[2] == 1, "NE (NaN != NaN) -> %d %d %d", r[0], r[1], r[2]);
  // float maximum propagates NaN
  auto m = nxt::make({3}, DType::F32);
  nx::ref::binary(BinaryOp::MAXIMUM, a->v, b->v, m->v);
  NX_EXPECT(m->v.ptr<float>()[1] == 2 && std::isnan(m->v.ptr<float>()[2]), "maximum NaN");
}

NX_TEST(ew_ref_cast_fill_where_known) {
  auto x = nxt::make({4}, DType::F32);
  float xv[4] = {-2.7f, 2.7f, 0.0f, 70000.0f};
  std::memcpy(x->v.data, xv, 16);
  auto i = nxt::make({4}, DType::I32), h = nxt::make({4}, DType::F16), bl = nxt::make({4}, DType::BOOL);
  nx::ref::cast(x->v, i->v);
  nx::ref::cast(x->v, h->v);
  nx::ref::cast(x->v, bl->v);
  const int32_t* iv = i->v.ptr<int32_t>();
  NX_EXPECT(iv[0] == -2 && iv[1] == 2 && iv[2] == 0 && iv[3] == 70000, "f32 -> i32 truncates");
  NX_EXPECT(h->v.ptr<uint16_t>()[3] == 0x7c00, "70000 -> f16 inf");
  NX_EXPECT(bl->v.ptr<uint8_t>()[0] == 1 && bl->v.ptr<uint8_t>()[2] == 0, "f32 -> bool is != 0");
  auto big = nxt::make({1}, DType::I64), f = nxt::make({1}, DType::F32);
  big->v.ptr<int64_t>()[0] = (int64_t{1} << 24) + 1;
  nx::ref::cast(big->v, f->v);
  NX_EXPECT(f->v.ptr<float>()[0] == 16777216.0f, "2^24+1 -> f32 rounds to even");
  auto l = nxt::make({2, 3}, DType::I64, Layout::Transposed);
  nx::ref::fill(l->v, 9007199254740993.0);  // 2^53 + 1 is not a double: the double is 2^53
  NX_EXPECT(l->v.ptr<int64_t>()[4] == 9007199254740992LL, "fill i64");
  auto c = nxt::make({3}, DType::BOOL), a = nxt::make({3}, DType::F32), b = nxt::make({3}, DType::F32),
       o = nxt::make({3}, DType::F32);
  uint8_t cv[3] = {1, 0, 1};
  float av[3] = {1, 2, 3}, bv[3] = {-1, -2, -3};
  std::memcpy(c->v.data, cv, 3);
  std::memcpy(a->v.data, av, 12);
  std::memcpy(b->v.data, bv, 12);
  nx::ref::where(c->v, a->v, b->v, o->v);
  const float* ov = o->v.ptr<float>();
  NX_EXPECT(ov[0] == 1 && ov[1] == -2 && ov[2] == 3, "where");
}

// ---------------------------------------------------------------------------------------------
// fast against ref
// ---------------------------------------------------------------------------------------------
NX_TEST(ew_fast_binary_float) {
  const BinaryOp ops[] = {BinaryOp::ADD, BinaryOp::SUB, BinaryOp::MUL, BinaryOp::DIV, BinaryOp::POW,
                          BinaryOp::MAXIMUM, BinaryOp::MINIMUM, BinaryOp::EQ, BinaryOp::NE, BinaryOp::LT,
                          BinaryOp::LE, BinaryOp::GT, BinaryOp::GE};
  for (const auto& shape : kShapes) {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    for (BinaryOp op : ops) {
      for (DType da : kFloatTypes) {
        for (DType db : kFloatTypes) {
          // the big shape only for same-dtype pairs (keeps the suite fast)
          if (n > 100000 && da != db) continue;
          Layout la = kLayouts[nxt::rand_int(0, 2)], lb = kLayouts[nxt::rand_int(0, 2)],
                 lo = kLayouts[nxt::rand_int(0, 2)];
          bool cmp = static_cast<int>(op) >= static_cast<int>(BinaryOp::EQ);
          DType dout = cmp ? DType::BOOL : (da == db ? da : DType::F32);
          double alo = op == BinaryOp::POW ? 0.1 : -2, ahi = 2;
          auto a = nxt::make(shape, da, la), b = nxt::make(shape, db, lb);
          nxt::fill_random(a->v, alo, ahi);
          nxt::fill_random(b->v, -2, 2);
          if (cmp && nxt::rand_int(0, 2) == 0) nx::ref::cast(a->v, b->v);  // ties for EQ/LE/GE
          check_binary(op, a->v, b->v, dout, lo, shape, "plain");
        }
      }
    }
  }
}

NX_TEST(ew_fast_binary_broadcast) {
  // row broadcast ([N,D] + [D]), column ([N,D] * [N,1]), scalar, outer ([N,1] + [1,D]) and a
  // middle-dim broadcast, each with f32 and narrow dtypes and every output layout.
  struct P { std::vector<int64_t> shape; std::vector<int> ba, bb; };
  const P pats[] = {
      {{64, 768}, {}, {0}},        {{5, 33}, {}, {0}},          {{300, 1000}, {}, {0}},
      {{64, 77}, {}, {1}},         {{257, 3}, {}, {1}},         {{7, 19}, {}, {0, 1}},
      {{100000}, {}, {0}},         {{33}, {0}, {}},             {{9, 31}, {1}, {0}},
      {{4, 5, 6}, {}, {1}},        {{2, 3, 4, 5}, {0, 2}, {1, 3}}, {{1, 1}, {}, {0, 1}},
  };
  const BinaryOp ops[] = {BinaryOp::ADD, BinaryOp::SUB, BinaryOp::MUL, BinaryOp::DIV, BinaryOp::MAXIMUM,
                          BinaryOp::POW, BinaryOp::LT};
  for (const auto& p : pats) {
    for (BinaryOp op : ops) {
      for (DType dt : kFloatTypes) {
        for (Layout lay : kLayouts) {
          DType db = nxt::rand_int(0, 1) ? dt : DType::F32;
          auto a = make_bcast(p.shape, p.ba, dt, lay, op == BinaryOp::POW ? 0.1 : -2, 2);
          auto b = make_bcast(p.shape, p.bb, db, Layout::Contiguous, -2, 2);
          bool cmp = op == BinaryOp::LT;
          DType dout = cmp ? DType::BOOL : dt;
          check_binary(op, a->v, b->v, dout, kLayouts[nxt::rand_int(0, 2)], p.shape, "bcast");
          check_binary(op, b->v, a->v, dout, Layout::Contiguous, p.shape, "bcast-swapped");
        }
      }
    }
  }
}

NX_TEST(ew_fast_binary_int_and_mixed) {
  // integer math (fast delegates to ref: must agree exactly), int inputs with float outputs, bool.
  const BinaryOp ops[] = {BinaryOp::ADD, BinaryOp::SUB, BinaryOp::MUL, BinaryOp::DIV, BinaryOp::POW,
                          BinaryOp::MAXIMUM, BinaryOp::MINIMUM, BinaryOp::EQ, BinaryOp::GT};
  const std::vector<std::vector<int64_t>> shapes = {{}, {5}, {3, 7}, {2, 3, 17}};
  for (const auto& shape : shapes) {
    for (BinaryOp op : ops) {
      for (DType dt : {DType::I32, DType::I64}) {
        auto a = nxt::make(shape, dt, kLayouts[nxt::rand_int(0, 2)]);
        auto b = nxt::make(shape, dt, kLayouts[nxt::rand_int(0, 2)]);
        nxt::fill_random(a->v, -50, 50);
        nxt::fill_random(b->v, 1, op == BinaryOp::POW ? 5 : 9);  // no division by zero / negative powers
        bool cmp = op == BinaryOp::EQ || op == BinaryOp::GT;
        check_binary(op, a->v, b->v, cmp ? DType::BOOL : dt, Layout::Contiguous, shape, "int");
        // int + float -> float math
        auto f = nxt::make(shape, DType::F32, Layout::Contiguous);
        nxt::fill_random(f->v, 0.5, 3);
        if (op != BinaryOp::POW) check_binary(op, a->v, f->v, cmp ? DType::BOOL : DType::F32, Layout::Strided, shape, "int-float");
      }
      auto a = nxt::make(shape, DType::BOOL), b = nxt::make(shape, DType::BOOL);
      nxt::fill_random(a->v, 0, 1);
      nxt::fill_random(b->v, 0, 1);
      if (op == BinaryOp::ADD || op == BinaryOp::MUL || op == BinaryOp::EQ || op == BinaryOp::MAXIMUM)
        check_binary(op, a->v, b->v, DType::BOOL, Layout::Contiguous, shape, "bool");
    }
  }
}

namespace {
// Tolerance of fast vs ref per unary op for an f32 result, with its reason.
void unary_tol(UnaryOp op, double* atol, double* rtol) {
  switch (op) {
    // exactly rounded in f32 on both paths
    case UnaryOp::NEG: case UnaryOp::ABS: case UnaryOp::SQRT: case UnaryOp::RELU: case UnaryOp::SQUARE:
    case UnaryOp::RECIPROCAL:
      *atol = 0; *rtol = 0; return;
    // two f32 roundings (sqrt then divide) vs one: 1 ulp, allowed 2
    case UnaryOp::RSQRT: *atol = 0; *rtol = 2.4e-7; return;
    // libm float functions (logf/sinf/cosf) vs double rounded: < 1 ulp each; results near 0 (log 1,
    // sin k*pi) are compared absolutely at f32 resolution of the input scale.
    case UnaryOp::LOG: case UnaryOp::SIN: case UnaryOp::COS: *atol = 1e-7; *rtol = 2.4e-7; return;
    // vector exp / tanh / sigmoid / silu: measured max 1-3 ulp (ew_vector_math_accuracy); 4 ulp allowed.
    // (Subnormal exp results are compared at 1e-38 absolute.)
    case UnaryOp::EXP: case UnaryOp::TANH: case UnaryOp::SIGMOID: case UnaryOp::SILU:
      *atol = 1e-38; *rtol = 4.8e-7; return;
    // gelu: error of exp(-2u) / erfc tail grows with |u| (f32 rounding of the argument), so a
    // relative 2e-6 plus an absolute 1e-7 floor for the exponentially small negative tail.
    case UnaryOp::GELU_TANH: case UnaryOp::GELU_ERF: *atol = 1e-7; *rtol = 2e-6; return;
  }
}
}  // namespace

NX_TEST(ew_fast_unary) {
  const UnaryOp ops[] = {UnaryOp::NEG, UnaryOp::ABS, UnaryOp::EXP, UnaryOp::LOG, UnaryOp::SQRT,
                         UnaryOp::RSQRT, UnaryOp::RELU, UnaryOp::GELU_TANH, UnaryOp::GELU_ERF, UnaryOp::SILU,
                         UnaryOp::TANH, UnaryOp::SIGMOID, UnaryOp::SIN, UnaryOp::COS, UnaryOp::SQUARE,
                         UnaryOp::RECIPROCAL};
  for (const auto& shape : kShapes) {
    for (UnaryOp op : ops) {
      for (DType dx : kFloatTypes) {
        for (DType dout : kFloatTypes) {
          int64_t n = 1;
          for (auto s : shape) n *= s;
          if (n > 100000 && dx != dout) continue;
          auto x = nxt::make(shape, dx, kLayouts[nxt::rand_int(0, 2)]);
          bool positive = op == UnaryOp::LOG || op == UnaryOp::SQRT || op == UnaryOp::RSQRT;
          nxt::fill_random(x->v, positive ? 0.01 : -8, 8);
          Layout lo = kLayouts[nxt::rand_int(0, 2)];
          auto o1 = nxt::make(shape, dout, lo), o2 = nxt::make(shape, dout, lo);
          nx::fast::unary(op, x->v, o1->v);
          nx::ref::unary(op, x->v, o2->v);
          double atol = 0, rtol = 0;
          unary_tol(op, &atol, &rtol);
          // narrow outputs: the f32 results may straddle a rounding boundary -> 1 ulp of the output
          rtol += one_ulp(dout);
          if (dout != DType::F32) atol = std::max(atol, 1e-7);
          char buf[128];
          std::snprintf(buf, sizeof buf, "unary %s %s->%s", uop_name(op), nx::dtype_name(dx), nx::dtype_name(dout));
          nxt::allclose(o1->v, o2->v, atol, rtol, buf);
        }
      }
    }
  }
  // broadcast input (stride 0), int inputs into float math, int-preserving ops on ints
  for (UnaryOp op : ops) {
    auto x = make_bcast({37, 19}, {0}, DType::F32, Layout::Contiguous, 0.5, 3);
    auto o1 = nxt::make({37, 19}, DType::F32), o2 = nxt::make({37, 19}, DType::F32);
    nx::fast::unary(op, x->v, o1->v);
    nx::ref::unary(op, x->v, o2->v);
    double atol = 0, rtol = 0;
    unary_tol(op, &atol, &rtol);
    nxt::allclose(o1->v, o2->v, atol, rtol, uop_name(op));
    for (DType dt : {DType::I32, DType::I64}) {
      auto xi = nxt::make({5, 9}, dt, Layout::Transposed);
      nxt::fill_random(xi->v, -9, 9);
      auto p1 = nxt::make({5, 9}, DType::F32), p2 = nxt::make({5, 9}, DType::F32);
      nx::fast::unary(op, xi->v, p1->v);
      nx::ref::unary(op, xi->v, p2->v);
      nxt::allclose(p1->v, p2->v, atol, rtol, "int -> f32 unary");
      auto q1 = nxt::make({5, 9}, dt), q2 = nxt::make({5, 9}, dt);
      if (op == UnaryOp::NEG || op == UnaryOp::ABS || op == UnaryOp::RELU || op == UnaryOp::SQUARE) {
        nx::fast::unary(op, xi->v, q1->v);
        nx::ref::unary(op, xi->v, q2->v);
        nxt::allclose(q1->v, q2->v, 0, 0, "int unary");  // integer math: exact
      }
    }
  }
}

NX_TEST(ew_fast_special_values) {
  // inf / NaN / huge / tiny inputs through every unary op and a few binary ops: fast must give the
  // same NaN-ness and infinities as ref (allclose treats NaN == NaN; inf vs finite fails).
  const float sv[] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 1e-30f, -1e-30f, 88.7f, 88.8f, -87.0f, -103.0f,
                      -104.5f, 1e30f, -1e30f, 20.0f, -20.0f, 9.5f, -9.5f, 0.74f, 0.76f, -5.0f, 5.0f, 1e-8f, 3e-45f};
  const int n = sizeof(sv) / sizeof(sv[0]);
  auto x = nxt::make({n}, DType::F32);
  std::memcpy(x->v.data, sv, sizeof sv);
  for (int k = 0; k <= static_cast<int>(UnaryOp::RECIPROCAL); k++) {
    UnaryOp op = static_cast<UnaryOp>(k);
    auto o1 = nxt::make({n}, DType::F32), o2 = nxt::make({n}, DType::F32);
    nx::fast::unary(op, x->v, o1->v);
    nx::ref::unary(op, x->v, o2->v);
    double atol = 0, rtol = 0;
    unary_tol(op, &atol, &rtol);
    // sin/cos of 1e30: glibc float vs double argument reduction agree only loosely (a value in [-1,1])
    if (op == UnaryOp::SIN || op == UnaryOp::COS) atol = 2.0;
    nxt::allclose(o1->v, o2->v, atol, rtol, uop_name(op));
  }
  for (BinaryOp op : {BinaryOp::ADD, BinaryOp::MUL, BinaryOp::DIV, BinaryOp::MAXIMUM, BinaryOp::MINIMUM,
                      BinaryOp::EQ, BinaryOp::NE, BinaryOp::LT, BinaryOp::GE}) {
    auto y = nxt::make({n}, DType::F32);
    for (int i = 0; i < n; i++) y->v.ptr<float>()[i] = sv[(i * 7 + 3) % n];
    bool cmp = static_cast<int>(op) >= static_cast<int>(BinaryOp::EQ);
    check_binary(op, x->v, y->v, cmp ? DType::BOOL : DType::F32, Layout::Contiguous, {n}, "special");
    check_binary(op, x->v, y->v, cmp ? DType::BOOL : DType::BF16, Layout::Contiguous, {n}, "special");
    check_binary(op, x->v, y->v, cmp ? DType::BOOL : DType::F16, Layout::Contiguous, {n}, "special");
  }
}

NX_TEST(ew_vector_math_accuracy) {
  // Max error of fast:: transcendental ops against ref (double math rounded to f32), in units of the
  // f32 ulp of the exact value, over 2M points on [-lim, lim]. Bounds: measured value + margin.
  // gelu_tanh's bound is loose on purpose: its f32 argument 2u = 2 sqrt(2/pi) (x + 0.044715 x^3)
  // carries ~2 ulp of rounding, which e^{-2u} multiplies by |2u| (~23 at x = -6) in the negative
  // tail; ref computes u in double. Any f32 evaluation has this (measured 45 ulp at x = -5.8, where
  // the result is -3e-10); for x > -3 the error is a few ulp.
  struct R { UnaryOp op; double lim; double max_ulp; };
  const R rs[] = {{UnaryOp::EXP, 88.0, 4}, {UnaryOp::TANH, 12.0, 4}, {UnaryOp::SIGMOID, 30.0, 4},
                  {UnaryOp::SILU, 30.0, 4}, {UnaryOp::GELU_TANH, 6.0, 64}, {UnaryOp::GELU_ERF, 6.0, 12}};
  const int64_t n = 1 << 21;
  for (const auto& r : rs) {
    auto x = nxt::make({n}, DType::F32), o = nxt::make({n}, DType::F32);
    float* xv = x->v.ptr<float>();
    for (int64_t i = 0; i < n; i++) xv[i] = static_cast<float>(-r.lim + 2 * r.lim * (i + 0.5) / n);
    nx::fast::unary(r.op, x->v, o->v);
    const float* ov = o->v.ptr<float>();
    double worst = 0, worst_x = 0;
    for (int64_t i = 0; i < n; i++) {
      double xd = xv[i], want;
      switch (r.op) {
        case UnaryOp::EXP: want = std::exp(xd); break;
        case UnaryOp::TANH: want = std::tanh(xd); break;
        case UnaryOp::SIGMOID: want = 1 / (1 + std::exp(-xd)); break;
        case UnaryOp::SILU: want = xd / (1 + std::exp(-xd)); break;
        case UnaryOp::GELU_TANH: want = xd / (1 + std::exp(-2 * 0.79788456080286535588 * (xd + 0.044715 * xd * xd * xd))); break;
        default: want = 0.5 * xd * std::erfc(-xd * 0.70710678118654752440); break;
      }
      float wf = static_cast<float>(want);
      if (wf == 0 || std::fabs(want) < 1e-37) continue;  // subnormal range: checked absolutely elsewhere
      double ulp = std::nextafter(std::fabs(wf), INFINITY) - std::fabs(wf);
      double e = std::fabs(ov[i] - want) / ulp;
      if (e > worst) { worst = e; worst_x = xd; }
    }
    std::printf("  %-10s max error %.2f ulp (at x = %.6g) over [-%g, %g]\n", uop_name(r.op), worst, worst_x, r.lim, r.lim);
    NX_EXPECT(worst <= r.max_ulp, "%s: %.2f ulp > %.0f", uop_name(r.op), worst, r.max_ulp);
  }
}

NX_TEST(ew_fast_cast) {
  const std::vector<std::vector<int64_t>> shapes = {{}, {1}, {31}, {6, 40}, {3, 4, 33}, {200, 700}};
  for (const auto& shape : shapes) {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    for (DType from : kAllTypes) {
      for (DType to : kAllTypes) {
        if (n > 100000 && from != to && !(nx::dtype_is_float(from) && nx::dtype_is_float(to))) continue;
        auto x = nxt::make(shape, from, kLayouts[nxt::rand_int(0, 2)]);
        nxt::fill_random(x->v, -100, 100);
        Layout lo = kLayouts[nxt::rand_int(0, 2)];
        auto o1 = nxt::make(shape, to, lo), o2 = nxt::make(shape, to, lo);
        nx::fast::cast(x->v, o1->v);
        nx::ref::cast(x->v, o2->v);
        char buf[96];
        std::snprintf(buf, sizeof buf, "cast %s->%s", nx::dtype_name(from), nx::dtype_name(to));
        nxt::allclose(o1->v, o2->v, 0, 0, buf);  // conversions are deterministic: exact
      }
    }
  }
  // ".transpose().contiguous()" copies (the tiled path), batched, odd sizes, every element size
  for (DType dt : kAllTypes) {
    for (auto shape : {std::vector<int64_t>{3, 37, 45}, std::vector<int64_t>{64, 64}, std::vector<int64_t>{2, 2, 9, 100}}) {
      auto x = nxt::make(shape, dt, Layout::Transposed);
      nxt::fill_random(x->v, -100, 100);
      auto o1 = nxt::make(shape, dt), o2 = nxt::make(shape, dt);
      nx::fast::cast(x->v, o1->v);
      nx::ref::cast(x->v, o2->v);
      nxt::allclose(o1->v, o2->v, 0, 0, "transposed copy");  // a pure copy: exact
    }
  }
  // broadcast source (expand + contiguous copy)
  auto b = make_bcast({50, 60}, {0}, DType::BF16, Layout::Contiguous);
  auto o1 = nxt::make({50, 60}, DType::F32), o2 = nxt::make({50, 60}, DType::F32);
  nx::fast::cast(b->v, o1->v);
  nx::ref::cast(b->v, o2->v);
  nxt::allclose(o1->v, o2->v, 0, 0, "cast broadcast bf16->f32");
}

NX_TEST(ew_fast_fill_where) {
  const std::vector<std::vector<int64_t>> shapes = {{}, {1}, {17}, {5, 9}, {300, 400}};
  for (const auto& shape : shapes) {
    for (DType dt : kAllTypes) {
      for (double val : {0.0, 1.5, -3.0, 1e10}) {
        Layout lo = kLayouts[nxt::rand_int(0, 2)];
        auto o1 = nxt::make(shape, dt, lo), o2 = nxt::make(shape, dt, lo);
        if (dt == DType::I32 && val > 1e9) continue;  // out of int32 range: undefined conversion
        nx::fast::fill(o1->v, val);
        nx::ref::fill(o2->v, val);
        nxt::allclose(o1->v, o2->v, 0, 0, "fill");
      }
      // where: cond broadcast on dim 0 in the 2-D shapes (attention-mask style)
      std::vector<int> bc;
      if (shape.size() == 2) bc = {0};
      auto c = make_bcast(shape, bc, DType::BOOL, Layout::Contiguous, 0, 1);
      auto a = nxt::make(shape, dt, kLayouts[nxt::rand_int(0, 2)]);
      std::vector<int> bc_b;
      if (shape.size() == 2) bc_b = {1};  // b broadcast along the other dim
      auto b = make_bcast(shape, bc_b, dt, Layout::Contiguous, -9, 9);
      nxt::fill_random(a->v, -9, 9);
      auto o1 = nxt::make(shape, dt), o2 = nxt::make(shape, dt);
      nx::fast::where(c->v, a->v, b->v, o1->v);
      nx::ref::where(c->v, a->v, b->v, o2->v);
      nxt::allclose(o1->v, o2->v, 0, 0, "where");  // a pure selection: exact
      // mixed dtypes go through the reference conversion path
      auto af = nxt::make(shape, DType::F32);
      nxt::fill_random(af->v);
      auto p1 = nxt::make(shape, DType::F32), p2 = nxt::make(shape, DType::F32);
      nx::fast::where(c->v, af->v, b->v, p1->v);
      nx::ref::where(c->v, af->v, b->v, p2->v);
      nxt::allclose(p1->v, p2->v, 0, 0, "where mixed");
    }
  }
}
