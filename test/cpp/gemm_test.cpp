// gemm_test.cpp: nx::fast::gemm against nx::ref::gemm (kernels/cpu/gemm.h).
//
// Covers both fast b layouts (row-major [K,N] and the transposed nn.Linear view with stride(0) == 1)
// plus a b with no unit stride (generic path); b in f32/bf16/f16; bias on/off and of every float dtype;
// non-contiguous a and out; odd sizes around the micro-tile (MR x NR = 8 x 48 with AVX-512), the
// matvec thresholds (M <= 4 single pass, M <= 8 grouped), the K block (768), the M block (192) and
// the N block (3072); size-0 and size-1 dims; 1, 2 and 3 pool threads.
//
// Tolerance (one formula, used by every check through `tol_for`): both sides accumulate in f32 but in
// a different order (the fast kernels split K into blocks, keep 16-lane partial sums and reduce them
// at the end). The difference of two f32 summations of K products is bounded in practice by
// ~ sqrt(K) * eps * |a_row| * |b_col| (random-walk rounding, eps = 2^-23 ~ 1.19e-7); with entries
// uniform in [-1, 1], |a_row| * |b_col| ~ K/3. We allow 2x that. bf16/f16 weights add no error of their
// own: both kernels widen the same bits exactly. A wrong index or a dropped term is off by ~0.1 or
// more, far above the tolerance for every K tested here (K = 1000: tol ~ 2.5e-3).
//
// The prepacked path (pack_weight + gemm_packed, the cases named gemm_packed_*) is checked the same way
// against ref::gemm on the unpacked weight, plus the properties it promises exactly: the packing equals
// ref::pack_weight bit for bit, the fused activation equals the product followed by fast::unary bit for
// bit, and each row of a batched product equals that row computed alone.
//
// Run: g++ -O3 -std=c++17 -march=native -I. test/cpp/harness.cpp test/cpp/gemm_test.cpp
//        kernels/cpu/gemm.cpp kernels/cpu/elementwise.cpp native/src/core/threadpool.cpp -lpthread
//        -o /tmp/gemm_test && /tmp/gemm_test gemm
// (also passes built for AVX2 (-mavx2 -mfma -mf16c) and plain SSE2 (no -m flags).)
#include <cmath>
#include <cstdio>

#include "../../kernels/cpu/gemm.h"
#include "harness.h"

namespace {

using nx::DType;
using nxt::Layout;

double tol_for(int64_t K) {
  const double eps = 1.1920929e-7;
  const double kk = static_cast<double>(K);
  return 2.0 * std::sqrt(kk) * eps * (kk / 3.0) + 1e-6;  // see the header comment
}

const char* lay_name(Layout l) {
  return l == Layout::Contiguous ? "contig" : l == Layout::Transposed ? "trans" : "strided";
}

struct Spec {
  int64_t M, N, K;
  DType bdt = DType::F32;
  Layout blay = Layout::Contiguous;  // Contiguous: row-major [K,N]; Transposed: W[N,K].t(); Strided: generic
  Layout alay = Layout::Contiguous;
  Layout olay = Layout::Contiguous;
  bool bias = false;
  DType bias_dt = DType::F32;
  Layout bias_lay = Layout::Contiguous;
};

void check(const Spec& s) {
  auto a = nxt::make({s.M, s.K}, DType::F32, s.alay);
  auto b = nxt::make({s.K, s.N}, s.bdt, s.blay);
  auto bias = nxt::make({s.N}, s.bias_dt, s.bias_lay);
  auto want = nxt::make({s.M, s.N}, DType::F32, s.olay);
  auto got = nxt::make({s.M, s.N}, DType::F32, s.olay);
  nxt::fill_random(a->v);
  nxt::fill_random(b->v);
  nxt::fill_random(bias->v);
  nxt::fill_random(want->v, 100.0, 200.0);  // garbage that must be overwritten
  nxt::fill_random(got->v, 100.0, 200.0);
  nx::ref::gemm(a->v, b->v, s.bias ? &bias->v : nullptr, want->v);
  nx::fast::gemm(a->v, b->v, s.bias ? &bias->v : nullptr, got->v);
  char what[256];
  std::snprintf(what, sizeof what, "M=%lld N=%lld K=%lld b=%s/%s a=%s out=%s bias=%s/%s threads=%d",
                static_cast<long long>(s.M), static_cast<long long>(s.N), static_cast<long long>(s.K),
                nx::dtype_name(s.bdt), lay_name(s.blay), lay_name(s.alay), lay_name(s.olay),
                s.bias ? nx::dtype_name(s.bias_dt) : "none", lay_name(s.bias_lay), nx::num_threads());
  // tolerance: f32 reordering error, sqrt(K) * eps * |a||b| (header comment); rtol 0 on purpose
  nxt::allclose(got->v, want->v, tol_for(s.K), 0.0, what);
}

struct ThreadScope {  // run a block with a given pool size, restoring the previous one
  int prev;
  explicit ThreadScope(int n) : prev(nx::num_threads()) { nx::set_num_threads(n); }
  ~ThreadScope() { nx::set_num_threads(prev); }
};

const DType kBDtypes[] = {DType::F32, DType::BF16, DType::F16};
const Layout kBLayouts[] = {Layout::Contiguous, Layout::Transposed, Layout::Strided};

// Every (b dtype, b layout, M, N, K) of the grid as a Spec, bias on for every other size sum.
template <size_t NM, size_t NN, size_t NK, class Fn>
void for_each_spec(const int64_t (&Ms)[NM], const int64_t (&Ns)[NN], const int64_t (&Ks)[NK], Fn&& fn) {
  for (DType dt : kBDtypes)
    for (Layout bl : kBLayouts)
      for (int64_t M : Ms)
        for (int64_t N : Ns)
          for (int64_t K : Ks) {
            Spec s{M, N, K};
            s.bdt = dt;
            s.blay = bl;
            s.bias = ((M + N + K) % 2) == 0;
            fn(s);
          }
}

}  // namespace

// Every M around the matvec threshold and the micro-tile height, odd N and K, all b dtypes/layouts.
NX_TEST(gemm_odd_sizes_all_b) {
  const int64_t Ms[] = {1, 2, 3, 4, 5, 7, 8, 9, 17};
  const int64_t Ns[] = {1, 3, 17, 48, 65};
  const int64_t Ks[] = {1, 3, 17, 65};
  for_each_spec(Ms, Ns, Ks, [](const Spec& s) { check(s); });
}

// Larger odd shapes: several micro-panels, K crossing the 768 block, edges in both M and N.
NX_TEST(gemm_blocked_shapes) {
  const int64_t shapes[][3] = {{65, 129, 129}, {129, 65, 385}, {33, 97, 800}, {8, 48, 384},
                               {16, 96, 768},  {1, 129, 1000}, {3, 257, 385}, {4, 1000, 129}};
  for (DType dt : kBDtypes)
    for (Layout bl : {Layout::Contiguous, Layout::Transposed})
      for (auto& sh : shapes)
        for (bool bias : {false, true}) {
          Spec s{sh[0], sh[1], sh[2]};
          s.bdt = dt;
          s.blay = bl;
          s.bias = bias;
          check(s);
        }
}

// Non-contiguous a and out (transposed and every-other-element views) on both paths.
NX_TEST(gemm_noncontiguous_a_out) {
  const int64_t shapes[][3] = {{1, 65, 33}, {3, 17, 129}, {9, 65, 17}, {65, 50, 100}};
  const Layout lays[] = {Layout::Contiguous, Layout::Transposed, Layout::Strided};
  for (auto& sh : shapes)
    for (Layout al : lays)
      for (Layout ol : lays)
        for (Layout bl : {Layout::Contiguous, Layout::Transposed}) {
          Spec s{sh[0], sh[1], sh[2]};
          s.alay = al;
          s.olay = ol;
          s.blay = bl;
          s.bdt = DType::BF16;
          s.bias = true;
          check(s);
        }
}

// Bias of every float dtype, contiguous and strided.
NX_TEST(gemm_bias_dtypes) {
  for (DType bdt : kBDtypes)
    for (Layout bl : {Layout::Contiguous, Layout::Strided})
      for (int64_t M : {1, 2, 12}) {
        Spec s{M, 70, 40};
        s.bias = true;
        s.bias_dt = bdt;
        s.bias_lay = bl;
        check(s);
      }
}

// Size-0 dims: M = 0 / N = 0 write nothing; K = 0 gives out = bias (or 0).
NX_TEST(gemm_empty_dims) {
  for (bool bias : {false, true})
    for (int64_t M : {0, 1, 9})
      for (int64_t N : {0, 5, 50})
        for (int64_t K : {0, 7}) {
          Spec s{M, N, K};
          s.bias = bias;
          check(s);
          s.blay = Layout::Transposed;
          check(s);
        }
}

// Thread partitions: 1, 2, 3 threads; N large enough to cross the N block (3072) per thread, M large
// enough to cross the M block (192), and matvec ranges split across threads.
NX_TEST(gemm_threads_and_big_blocks) {
  for (int threads : {1, 2, 3}) {
    ThreadScope ts(threads);
    const int64_t shapes[][3] = {{9, 6300, 24},  {420, 40, 24}, {130, 300, 64}, {1, 4099, 70},
                                 {4, 3001, 33},  {3, 700, 301}, {1, 260, 999},  {200, 3100, 8},
                                 {6, 4099, 70},  {7, 300, 301}, {8, 1000, 200}, {5, 77, 1001}};
    for (auto& sh : shapes)
      for (Layout bl : {Layout::Contiguous, Layout::Transposed})
        for (DType dt : {DType::F32, DType::F16}) {
          Spec s{sh[0], sh[1], sh[2]};
          s.blay = bl;
          s.bdt = dt;
          s.bias = true;
          check(s);
        }
  }
}

// Randomised shapes (fixed seed via the harness rng), every option drawn at random.
NX_TEST(gemm_random_shapes) {
  for (int it = 0; it < 150; it++) {
    Spec s{nxt::rand_int(1, 70), nxt::rand_int(1, 150), nxt::rand_int(1, 450)};
    if (it % 4 == 0) s.M = nxt::rand_int(1, 8);  // matvec / grouped-stream paths often
    s.bdt = kBDtypes[nxt::rand_int(0, 2)];
    s.blay = kBLayouts[nxt::rand_int(0, 2)];
    s.alay = kBLayouts[nxt::rand_int(0, 2)];
    s.olay = kBLayouts[nxt::rand_int(0, 2)];
    s.bias = nxt::rand_int(0, 1) == 1;
    s.bias_dt = kBDtypes[nxt::rand_int(0, 2)];
    check(s);
  }
}

// ------------------------------------------------------------------------------------------------
// Prepacked weights: pack_weight + gemm_packed (gemm.h; the pack_weight / linear_packed ops).
// ------------------------------------------------------------------------------------------------
#include <cstdlib>
#include <cstring>
#include <memory>

#include "../../kernels/cpu/elementwise.h"

namespace {

struct Packed {  // 64-byte aligned (the AVX-512 packing stores aligned panels)
  std::unique_ptr<float, void (*)(void*)> p{nullptr, std::free};
  int64_t numel = 0;
};
Packed pack_of(const nx::KView& b, bool use_ref) {
  Packed pk;
  pk.numel = nx::packed_numel(b.size(0), b.size(1));
  const size_t bytes = (static_cast<size_t>(std::max<int64_t>(pk.numel, 1)) * sizeof(float) + 63) / 64 * 64;
  pk.p.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
  for (int64_t i = 0; i < pk.numel; i++) pk.p.get()[i] = 12345.0f;  // garbage that must be overwritten
  use_ref ? nx::ref::pack_weight(b, pk.p.get()) : nx::fast::pack_weight(b, pk.p.get());
  return pk;
}

const char* act_name(nx::Epilogue e) {
  return e == nx::Epilogue::NONE ? "none" : e == nx::Epilogue::GELU_TANH ? "gelu_tanh" : "gelu_erf";
}

// fast::gemm_packed vs ref::gemm on the unpacked weight (+ ref::unary for the activation).
void check_packed(const Spec& s, nx::Epilogue act = nx::Epilogue::NONE) {
  auto a = nxt::make({s.M, s.K}, DType::F32, s.alay);
  auto b = nxt::make({s.K, s.N}, s.bdt, s.blay);
  auto bias = nxt::make({s.N}, s.bias_dt, s.bias_lay);
  auto want = nxt::make({s.M, s.N}, DType::F32, s.olay);
  auto got = nxt::make({s.M, s.N}, DType::F32, s.olay);
  nxt::fill_random(a->v);
  nxt::fill_random(b->v);
  nxt::fill_random(bias->v);
  nxt::fill_random(want->v, 100.0, 200.0);
  nxt::fill_random(got->v, 100.0, 200.0);
  Packed pk = pack_of(b->v, false);
  nx::ref::gemm(a->v, b->v, s.bias ? &bias->v : nullptr, want->v);
  if (act != nx::Epilogue::NONE)
    nx::ref::unary(act == nx::Epilogue::GELU_TANH ? nx::UnaryOp::GELU_TANH : nx::UnaryOp::GELU_ERF, want->v, want->v);
  nx::fast::gemm_packed(a->v, pk.p.get(), s.N, s.bias ? &bias->v : nullptr, nullptr, act, got->v);
  char what[256];
  std::snprintf(what, sizeof what, "packed M=%lld N=%lld K=%lld b=%s/%s a=%s out=%s bias=%s act=%s threads=%d",
                static_cast<long long>(s.M), static_cast<long long>(s.N), static_cast<long long>(s.K),
                nx::dtype_name(s.bdt), lay_name(s.blay), lay_name(s.alay), lay_name(s.olay),
                s.bias ? nx::dtype_name(s.bias_dt) : "none", act_name(act), nx::num_threads());
  // tolerance: the f32 reordering bound of tol_for (header comment). With an activation: gelu's slope
  // is at most 1.13, so the sum's error passes through scaled by <= 1.13, plus the vector gelu's own
  // error against ref's double evaluation (elementwise_test: atol 1e-7, rtol 2e-6 of the result, and
  // results here are O(sqrt(K)) at most, so 2e-6 * (1 + sqrt(K)) covers it absolutely).
  const double tol = act == nx::Epilogue::NONE ? tol_for(s.K)
                                                : 1.13 * tol_for(s.K) + 1e-7 + 2e-6 * (1.0 + std::sqrt(static_cast<double>(s.K)));
  nxt::allclose(got->v, want->v, tol, 0.0, what);
}

}  // namespace

// The packed layout itself: fast::pack_weight writes exactly what ref::pack_weight (the layout written
// out in gemm.h) does, for every b dtype and layout, N around the panel width, K of every size (bf16 and
// f16 widen exactly, so equality is exact).
NX_TEST(gemm_packed_layout) {
  const int64_t W = nx::packed_width();
  const int64_t Ns[] = {1, 3, W - 1, W, W + 1, 2 * W + 5, 130};
  const int64_t Ks[] = {1, 2, 17, 100, 769};
  for (DType dt : kBDtypes)
    for (Layout bl : kBLayouts)
      for (int64_t N : Ns)
        for (int64_t K : Ks) {
          auto b = nxt::make({K, N}, dt, bl);
          nxt::fill_random(b->v);
          Packed f = pack_of(b->v, false), r = pack_of(b->v, true);
          NX_EXPECT(f.numel == ((N + W - 1) / W) * W * K, "packed_numel K=%lld N=%lld", static_cast<long long>(K),
                    static_cast<long long>(N));
          NX_EXPECT(std::memcmp(f.p.get(), r.p.get(), static_cast<size_t>(f.numel) * sizeof(float)) == 0,
                    "pack_weight fast != ref: K=%lld N=%lld b=%s/%s", static_cast<long long>(K), static_cast<long long>(N),
                    nx::dtype_name(dt), lay_name(bl));
        }
}

// Odd sizes: M across the streaming threshold (<= 8 rows: one micro-tile height) and the micro-tile,
// N around the panel width, K crossing the 768 block, every b dtype / layout, bias on and off.
NX_TEST(gemm_packed_odd_sizes) {
  const int64_t W = nx::packed_width();
  const int64_t Ms[] = {1, 2, 3, 7, 8, 9, 17, 33};
  const int64_t Ns[] = {1, 5, W, W + 1, 3 * W - 1};
  const int64_t Ks[] = {1, 3, 65, 770};
  for_each_spec(Ms, Ns, Ks, [](const Spec& s) {
    if (s.blay == Layout::Strided && (s.M * s.N * s.K) % 3 != 0) return;  // the generic packing: a sample
    check_packed(s);
  });
}

// Non-contiguous a and out, bias of every float dtype / strided, size-0 and K = 0 (out = act(bias)).
NX_TEST(gemm_packed_views_and_edges) {
  const int64_t shapes[][3] = {{1, 65, 33}, {5, 17, 129}, {12, 97, 40}, {65, 50, 100}};
  const Layout lays[] = {Layout::Contiguous, Layout::Transposed, Layout::Strided};
  for (auto& sh : shapes)
    for (Layout al : lays)
      for (Layout ol : lays) {
        Spec s{sh[0], sh[1], sh[2]};
        s.alay = al;
        s.olay = ol;
        s.blay = Layout::Transposed;
        s.bdt = DType::BF16;
        s.bias = true;
        s.bias_dt = kBDtypes[(sh[0] + sh[1]) % 3];
        s.bias_lay = al == Layout::Strided ? Layout::Strided : Layout::Contiguous;
        check_packed(s);
      }
  for (bool bias : {false, true})
    for (int64_t M : {0, 1, 9})
      for (int64_t N : {0, 5, 50})
        for (int64_t K : {0, 7}) {
          Spec s{M, N, K};
          s.bias = bias;
          check_packed(s);
          check_packed(s, nx::Epilogue::GELU_TANH);
        }
}

// The fused activation: against ref (tolerance in check_packed), and bit for bit equal to the unfused
// product followed by fast::unary (the model's fused MLP must equal its traced, unfused form exactly).
NX_TEST(gemm_packed_epilogue) {
  const int64_t shapes[][3] = {{1, 100, 64}, {6, 97, 200}, {40, 150, 800}, {130, 50, 33}};
  for (nx::Epilogue act : {nx::Epilogue::GELU_TANH, nx::Epilogue::GELU_ERF})
    for (auto& sh : shapes) {
      Spec s{sh[0], sh[1], sh[2]};
      s.bias = true;
      check_packed(s, act);
      auto a = nxt::make({s.M, s.K}, DType::F32);
      auto b = nxt::make({s.K, s.N}, DType::F32);
      auto bias = nxt::make({s.N}, DType::F32);
      auto fused = nxt::make({s.M, s.N}, DType::F32), plain = nxt::make({s.M, s.N}, DType::F32);
      auto after = nxt::make({s.M, s.N}, DType::F32);
      nxt::fill_random(a->v, -3.0, 3.0);
      nxt::fill_random(b->v);
      nxt::fill_random(bias->v);
      Packed pk = pack_of(b->v, false);
      nx::fast::gemm_packed(a->v, pk.p.get(), s.N, &bias->v, nullptr, act, fused->v);
      nx::fast::gemm_packed(a->v, pk.p.get(), s.N, &bias->v, nullptr, nx::Epilogue::NONE, plain->v);
      nx::fast::unary(act == nx::Epilogue::GELU_TANH ? nx::UnaryOp::GELU_TANH : nx::UnaryOp::GELU_ERF, plain->v, after->v);
      NX_EXPECT(std::memcmp(fused->v.data, after->v.data, static_cast<size_t>(s.M * s.N) * sizeof(float)) == 0,
                "fused %s differs from gemm_packed + unary: M=%lld N=%lld K=%lld", act_name(act),
                static_cast<long long>(s.M), static_cast<long long>(s.N), static_cast<long long>(s.K));
    }
}

// Thread splits (1, 2, 3 threads; panels and rows both split) and the property gemm.h promises: every
// row is computed the same way whatever M and the thread count, so each row of a batched product equals
// that row computed alone (M = 1, streaming path) bit for bit.
NX_TEST(gemm_packed_threads_rows_independent) {
  const int64_t shapes[][3] = {{9, 6300, 24}, {420, 40, 24}, {130, 300, 64}, {1, 4099, 70}, {4, 3001, 33},
                               {200, 310, 800}, {8, 1000, 1600}, {33, 97, 1537}};
  for (int threads : {1, 2, 3}) {
    ThreadScope ts(threads);
    for (auto& sh : shapes)
      for (Layout bl : {Layout::Contiguous, Layout::Transposed}) {
        Spec s{sh[0], sh[1], sh[2]};
        s.blay = bl;
        s.bias = true;
        check_packed(s);
      }
  }
  for (auto& sh : shapes) {
    const int64_t M = sh[0], N = sh[1], K = sh[2];
    auto a = nxt::make({M, K}, DType::F32);
    auto b = nxt::make({K, N}, DType::F32);
    auto bias = nxt::make({N}, DType::F32);
    auto all = nxt::make({M, N}, DType::F32);
    nxt::fill_random(a->v);
    nxt::fill_random(b->v);
    nxt::fill_random(bias->v);
    Packed pk = pack_of(b->v, false);
    {
      ThreadScope ts(2);
      nx::fast::gemm_packed(a->v, pk.p.get(), N, &bias->v, nullptr, nx::Epilogue::NONE, all->v);
    }
    std::vector<float> one(static_cast<size_t>(N));
    int bad = 0;
    for (int64_t i = 0; i < M && bad == 0; i++) {
      ThreadScope ts(1 + static_cast<int>(i % 3));
      nx::KView ar = a->v, orow = a->v;
      ar.shape[0] = 1;
      ar.data = a->v.ptr<float>() + i * a->v.stride(0);
      orow.shape[0] = 1;
      orow.shape[1] = N;
      orow.strides[0] = N;
      orow.strides[1] = 1;
      orow.data = one.data();
      nx::fast::gemm_packed(ar, pk.p.get(), N, &bias->v, nullptr, nx::Epilogue::NONE, orow);
      if (std::memcmp(one.data(), all->v.ptr<float>() + i * all->v.stride(0), static_cast<size_t>(N) * sizeof(float)) != 0) bad++;
    }
    NX_EXPECT(bad == 0, "row of a batched packed product differs from that row alone: M=%lld N=%lld K=%lld",
              static_cast<long long>(M), static_cast<long long>(N), static_cast<long long>(K));
  }
}

// The residual epilogue (out = residual + act(a @ b + bias)): against ref with the residual added in
// the reference too (the add is exact up to one f32 rounding on each side: same tolerance as the
// product), for residuals of every float dtype and layout, both paths (streaming M <= 8 and GEMM), with
// and without an activation; and bit for bit equal to gemm_packed followed by fast::binary ADD.
NX_TEST(gemm_packed_residual) {
  const int64_t shapes[][3] = {{1, 100, 64}, {5, 97, 33}, {8, 49, 770}, {40, 150, 800}, {130, 50, 33}};
  const Layout lays[] = {Layout::Contiguous, Layout::Transposed, Layout::Strided};
  for (auto& sh : shapes)
    for (DType rdt : kBDtypes)
      for (Layout rl : lays)
        for (nx::Epilogue act : {nx::Epilogue::NONE, nx::Epilogue::GELU_TANH}) {
          const int64_t M = sh[0], N = sh[1], K = sh[2];
          auto a = nxt::make({M, K}, DType::F32);
          auto b = nxt::make({K, N}, DType::F32, Layout::Transposed);
          auto bias = nxt::make({N}, DType::F32);
          auto res = nxt::make({M, N}, rdt, rl);
          auto want = nxt::make({M, N}, DType::F32), got = nxt::make({M, N}, DType::F32);
          nxt::fill_random(a->v);
          nxt::fill_random(b->v);
          nxt::fill_random(bias->v);
          nxt::fill_random(res->v, -5.0, 5.0);
          nxt::fill_random(got->v, 100.0, 200.0);
          Packed pk = pack_of(b->v, false);
          nx::ref::gemm(a->v, b->v, &bias->v, want->v);
          if (act != nx::Epilogue::NONE) nx::ref::unary(nx::UnaryOp::GELU_TANH, want->v, want->v);
          nx::ref::binary(nx::BinaryOp::ADD, res->v, want->v, want->v);
          nx::fast::gemm_packed(a->v, pk.p.get(), N, &bias->v, &res->v, act, got->v);
          char what[200];
          std::snprintf(what, sizeof what, "packed+residual M=%lld N=%lld K=%lld res=%s/%s act=%s", static_cast<long long>(M),
                        static_cast<long long>(N), static_cast<long long>(K), nx::dtype_name(rdt), lay_name(rl), act_name(act));
          // as check_packed, plus one f32 rounding of sums up to |res| + |product| ~ 5 + sqrt(K)
          const double tol = (act == nx::Epilogue::NONE ? tol_for(K) : 1.13 * tol_for(K) + 1e-7 + 2e-6 * (1.0 + std::sqrt(static_cast<double>(K)))) +
                             1.2e-7 * (5.0 + std::sqrt(static_cast<double>(K)));
          nxt::allclose(got->v, want->v, tol, 0.0, what);
          // bit identity with the unfused form
          auto plain = nxt::make({M, N}, DType::F32), sum = nxt::make({M, N}, DType::F32);
          nx::fast::gemm_packed(a->v, pk.p.get(), N, &bias->v, nullptr, act, plain->v);
          nx::fast::binary(nx::BinaryOp::ADD, res->v, plain->v, sum->v);
          NX_EXPECT(std::memcmp(got->v.data, sum->v.data, static_cast<size_t>(M * N) * sizeof(float)) == 0,
                    "fused residual differs from gemm_packed + add: %s", what);
        }
}

// packed_columns: rows of an embedding table E [N, K] read from the packed form of E.t() (a tied LM
// head) equal ref::embedding on E exactly (a copy), for N around the panel width, ids of both int
// dtypes and non-contiguous, out strided, a size-1 table; an id out of range is INDEX before any write.
#include "../../kernels/cpu/index.h"
NX_TEST(gemm_packed_columns) {
  const int64_t W = nx::packed_width();
  const int64_t Ns[] = {1, W - 1, W, 2 * W + 3, 300};
  const int64_t Ks[] = {1, 7, 64};
  for (int64_t N : Ns)
    for (int64_t K : Ks)
      for (DType idt : {DType::I32, DType::I64})
        for (Layout ol : {Layout::Contiguous, Layout::Strided}) {
          auto e = nxt::make({N, K}, DType::F32);
          nxt::fill_random(e->v);
          nx::KView et = e->v;  // E.t(): [K, N], strides [1, K]
          std::swap(et.shape[0], et.shape[1]);
          std::swap(et.strides[0], et.strides[1]);
          Packed pk = pack_of(et, false);
          auto ids = nxt::make({3, 5}, idt, Layout::Transposed);  // a non-contiguous [3, 5] view
          for (int64_t i = 0; i < 15; i++) {
            int64_t idx[2] = {i / 5, i % 5};
            nx::store_i64(ids->v.data, idt, ids->v.offset_of(idx), (i * 7919 + 3) % N);
          }
          auto want = nxt::make({3, 5, K}, DType::F32, ol), got = nxt::make({3, 5, K}, DType::F32, ol);
          nxt::fill_random(got->v, 100.0, 200.0);
          nx::ref::embedding(e->v, ids->v, want->v);
          nx::packed_columns(pk.p.get(), K, N, ids->v, got->v);
          char what[128];
          std::snprintf(what, sizeof what, "packed_columns N=%lld K=%lld ids=%s out=%s", static_cast<long long>(N),
                        static_cast<long long>(K), nx::dtype_name(idt), lay_name(ol));
          nxt::allclose(got->v, want->v, 0.0, 0.0, what);  // a copy: exact
        }
  // out of range: INDEX, and nothing written
  auto e = nxt::make({10, 4}, DType::F32);
  nxt::fill_random(e->v);
  nx::KView et = e->v;
  std::swap(et.shape[0], et.shape[1]);
  std::swap(et.strides[0], et.strides[1]);
  Packed pk = pack_of(et, false);
  for (int64_t bad : {-1, 10}) {
    auto ids = nxt::make({3}, DType::I64);
    nx::store_i64(ids->v.data, DType::I64, 0, 2);
    nx::store_i64(ids->v.data, DType::I64, 1, bad);
    nx::store_i64(ids->v.data, DType::I64, 2, 3);
    auto out = nxt::make({3, 4}, DType::F32);
    for (int i = 0; i < 12; i++) out->v.ptr<float>()[i] = 7.0f;
    bool threw = false;
    try {
      nx::packed_columns(pk.p.get(), 4, 10, ids->v, out->v);
    } catch (const nx::Error& err) {
      threw = err.code == "INDEX" && std::string(err.what()).find(std::to_string(bad)) != std::string::npos;
    }
    NX_EXPECT(threw, "packed_columns: id %lld out of [0, 10) must throw INDEX naming it", static_cast<long long>(bad));
    bool untouched = true;
    for (int i = 0; i < 12; i++) untouched = untouched && out->v.ptr<float>()[i] == 7.0f;
    NX_EXPECT(untouched, "packed_columns wrote before its index check");
  }
}
