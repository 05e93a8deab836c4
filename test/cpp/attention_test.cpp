// attention_test.cpp: rope and attention, fast vs ref on random shapes, and ref vs hand-computed values.
//
// Run: g++ -O3 -std=c++17 -march=native -I. test/cpp/harness.cpp test/cpp/attention_test.cpp
//        kernels/cpu/attention.cpp native/src/core/threadpool.cpp -lpthread -o /tmp/att && /tmp/att
#include <algorithm>
#include <cmath>
#include <vector>

#include "../../kernels/cpu/attention.h"
#include "harness.h"

using nx::DType;
using nx::KView;
using nxt::Layout;

namespace {

// A [.., len, ..] window of dim `dim` starting at t0 (a view into a bigger buffer, as a KV cache is).
KView narrow(const KView& v, int dim, int64_t t0, int64_t len) {
  KView r = v;
  r.shape[dim] = len;
  r.data = static_cast<unsigned char*>(v.data) + t0 * v.strides[dim] * static_cast<int64_t>(nx::dtype_size(v.dtype));
  return r;
}

void set(const KView& v, std::initializer_list<int64_t> idx, float x) {
  int64_t o = 0;
  int d = 0;
  for (int64_t i : idx) o += i * v.strides[d++];
  nx::store_f32(v.data, v.dtype, o, x);
}
float get(const KView& v, std::initializer_list<int64_t> idx) {
  int64_t o = 0;
  int d = 0;
  for (int64_t i : idx) o += i * v.strides[d++];
  return nx::load_f32(v.data, v.dtype, o);
}

bool any_nan(const KView& v) {
  for (float x : nxt::to_f32(v))
    if (std::isnan(x)) return true;
  return false;
}

std::shared_ptr<nxt::Buf> inv_freq_buf(int64_t R, double theta = 10000.0) {
  auto f = nxt::make({R / 2}, DType::F32);
  for (int64_t i = 0; i < R / 2; i++)
    f->v.ptr<float>()[i] = static_cast<float>(1.0 / std::pow(theta, 2.0 * i / static_cast<double>(R)));
  return f;
}

// positions [B, T]: row b starts at start[b] (left padding gives different starts per row)
std::shared_ptr<nxt::Buf> pos_buf(int64_t B, int64_t T, const std::vector<int64_t>& start, DType dt) {
  auto p = nxt::make({B, T}, dt);
  for (int64_t b = 0; b < B; b++)
    for (int64_t t = 0; t < T; t++) nx::store_i64(p->v.data, dt, b * T + t, start[b] + t);
  return p;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// rope: reference vs hand-computed values
// ---------------------------------------------------------------------------------------------------
NX_TEST(rope_ref_hand_values) {
  // D = R = 2, inv_freq = [1], pos = 1: [1, 0] -> [cos 1, sin 1]; [0, 1] -> [-sin 1, cos 1]
  for (bool inter : {true, false}) {
    auto x = nxt::make({1, 1, 2, 2}, DType::F32), out = nxt::make({1, 1, 2, 2}, DType::F32);
    set(x->v, {0, 0, 0, 0}, 1), set(x->v, {0, 0, 0, 1}, 0);
    set(x->v, {0, 0, 1, 0}, 0), set(x->v, {0, 0, 1, 1}, 1);
    auto f = nxt::make({1}, DType::F32);
    f->v.ptr<float>()[0] = 1.0f;
    auto p = pos_buf(1, 1, {1}, DType::I64);
    nx::ref::rope(x->v, p->v, f->v, inter, out->v);
    // 1e-7: one f32 rounding of cos/sin of an exact angle
    NX_EXPECT(std::fabs(get(out->v, {0, 0, 0, 0}) - std::cos(1.0)) < 1e-7, "cos");
    NX_EXPECT(std::fabs(get(out->v, {0, 0, 0, 1}) - std::sin(1.0)) < 1e-7, "sin");
    NX_EXPECT(std::fabs(get(out->v, {0, 0, 1, 0}) + std::sin(1.0)) < 1e-7, "-sin");
    NX_EXPECT(std::fabs(get(out->v, {0, 0, 1, 1}) - std::cos(1.0)) < 1e-7, "cos");
  }
}

NX_TEST(rope_position_zero_is_identity) {
  for (bool inter : {true, false})
    for (int64_t D : {8, 64, 80}) {
      auto x = nxt::make({2, 3, 4, D}, DType::F32);
      nxt::fill_random(x->v);
      auto f = inv_freq_buf(D);
      auto p = nxt::make({2, 3}, DType::I32);  // all zero
      auto o1 = nxt::make({2, 3, 4, D}, DType::F32), o2 = nxt::make({2, 3, 4, D}, DType::F32);
      nx::ref::rope(x->v, p->v, f->v, inter, o1->v);
      nx::fast::rope(x->v, p->v, f->v, inter, o2->v);
      // exact: cos 0 = 1 and sin 0 = 0 leave every value unchanged
      nxt::allclose(o1->v, x->v, 0, 0, "ref rope at pos 0");
      nxt::allclose(o2->v, x->v, 0, 0, "fast rope at pos 0");
    }
}

NX_TEST(rope_rotate_half_equals_interleaved_after_permutation) {
  // Permuting each head's first R dims with new[i] = old[2i], new[R/2 + i] = old[2i + 1] turns the
  // interleaved convention into rotate_half (this is how HF checkpoints permute q/k weights).
  for (int64_t D : {8, 64, 80})
    for (int64_t R : {D, D / 2}) {
      const int64_t B = 2, T = 5, H = 3;
      auto xi = nxt::make({B, T, H, D}, DType::F32), xh = nxt::make({B, T, H, D}, DType::F32);
      nxt::fill_random(xi->v);
      auto perm = [&](const KView& src, const KView& dst) {
        for (int64_t b = 0; b < B; b++)
          for (int64_t t = 0; t < T; t++)
            for (int64_t h = 0; h < H; h++) {
              for (int64_t i = 0; i < R / 2; i++) {
                set(dst, {b, t, h, i}, get(src, {b, t, h, 2 * i}));
                set(dst, {b, t, h, R / 2 + i}, get(src, {b, t, h, 2 * i + 1}));
              }
              for (int64_t d = R; d < D; d++) set(dst, {b, t, h, d}, get(src, {b, t, h, d}));
            }
      };
      perm(xi->v, xh->v);
      auto f = inv_freq_buf(R);
      auto p = pos_buf(B, T, {7, 300}, DType::I64);
      auto oi = nxt::make({B, T, H, D}, DType::F32), oh = nxt::make({B, T, H, D}, DType::F32);
      auto oip = nxt::make({B, T, H, D}, DType::F32);
      nx::ref::rope(xi->v, p->v, f->v, true, oi->v);
      nx::ref::rope(xh->v, p->v, f->v, false, oh->v);
      perm(oi->v, oip->v);
      // exact: the same pairs see the same angle and the same arithmetic
      nxt::allclose(oip->v, oh->v, 0, 0, "rotate_half vs permuted interleaved");
    }
}

// ---------------------------------------------------------------------------------------------------
// rope: fast vs ref
// ---------------------------------------------------------------------------------------------------
NX_TEST(rope_fast_vs_ref) {
  for (DType dt : {DType::F32, DType::BF16, DType::F16})
    for (int64_t D : {8, 64, 80, 128})
      for (int64_t T : {1, 3, 17, 129})
        for (bool inter : {true, false}) {
          const int64_t B = 2, H = 3;
          const int64_t R = (T % 2) ? D : (D == 8 ? 4 : D / 2);  // full and partial rotary dims
          Layout lay = (T == 17) ? Layout::Strided : Layout::Contiguous;
          auto x = nxt::make({B, T, H, D}, dt, lay);
          nxt::fill_random(x->v, -2, 2);
          auto f = inv_freq_buf(R);
          // left padding: row 1 starts later; T = 129 uses large positions to test angle handling
          auto p = pos_buf(B, T, {0, T == 129 ? 4000 : 5}, T == 3 ? DType::I32 : DType::I64);
          auto o1 = nxt::make({B, T, H, D}, dt), o2 = nxt::make({B, T, H, D}, dt);
          nx::ref::rope(x->v, p->v, f->v, inter, o1->v);
          nx::fast::rope(x->v, p->v, f->v, inter, o2->v);
          // f32: both rotate by the same f32 angle; cosf/sinf vs double cos/sin differ by ~1 ulp of the
          // result, times |x| <= 2, plus one f32 fma rounding -> 2e-6 abs. bf16/f16 take the ref path
          // (exact), the tolerance still covers one rounding of the output dtype.
          const double atol = dt == DType::F32 ? 2e-6 : 1e-2;
          char what[128];
          std::snprintf(what, sizeof what, "rope %s D=%lld T=%lld R=%lld inter=%d", nx::dtype_name(dt),
                        (long long)D, (long long)T, (long long)R, inter);
          nxt::allclose(o2->v, o1->v, atol, 1e-5, what);
        }
}

NX_TEST(rope_fast_in_place) {
  for (bool inter : {true, false}) {
    const int64_t B = 1, T = 9, H = 4, D = 80, R = 64;
    auto x = nxt::make({B, T, H, D}, DType::F32);
    nxt::fill_random(x->v);
    auto f = inv_freq_buf(R);
    auto p = pos_buf(B, T, {11}, DType::I64);
    auto want = nxt::make({B, T, H, D}, DType::F32);
    nx::ref::rope(x->v, p->v, f->v, inter, want->v);
    nx::fast::rope(x->v, p->v, f->v, inter, x->v);  // out aliases x
    nxt::allclose(x->v, want->v, 2e-6, 1e-5, "rope in place");  // same reason as rope_fast_vs_ref
  }
}

// ---------------------------------------------------------------------------------------------------
// attention: reference vs hand-computed values
// ---------------------------------------------------------------------------------------------------
NX_TEST(attention_ref_hand_values) {
  // D = 2, Tk = Tq = 2, scale 1. q0 = [1, 0]: causal, sees only key 0 -> v0.
  // q1 = [1, 0] sees k0 = [1, 0] (score 1) and k1 = [0, 0] (score 0):
  // out = (e v0 + v1) / (e + 1) with v0 = [1, 0], v1 = [0, 1].
  auto q = nxt::make({1, 1, 2, 2}, DType::F32), k = nxt::make({1, 1, 2, 2}, DType::F32);
  auto v = nxt::make({1, 1, 2, 2}, DType::F32), out = nxt::make({1, 1, 2, 2}, DType::F32);
  set(q->v, {0, 0, 0, 0}, 1), set(q->v, {0, 0, 1, 0}, 1);
  set(k->v, {0, 0, 0, 0}, 1);
  set(v->v, {0, 0, 0, 0}, 1), set(v->v, {0, 0, 1, 1}, 1);
  for (int which = 0; which < 2; which++) {
    if (which == 0) nx::ref::attention(q->v, k->v, v->v, nullptr, 1.0f, out->v);
    else nx::fast::attention(q->v, k->v, v->v, nullptr, 1.0f, out->v);
    const double e = std::exp(1.0);
    // 1e-6: f32 output of a 2-term softmax
    NX_EXPECT(std::fabs(get(out->v, {0, 0, 0, 0}) - 1.0) < 1e-6, "row0[0] (%d)", which);
    NX_EXPECT(std::fabs(get(out->v, {0, 0, 0, 1}) - 0.0) < 1e-6, "row0[1] (%d)", which);
    NX_EXPECT(std::fabs(get(out->v, {0, 0, 1, 0}) - e / (e + 1)) < 1e-6, "row1[0] (%d)", which);
    NX_EXPECT(std::fabs(get(out->v, {0, 0, 1, 1}) - 1 / (e + 1)) < 1e-6, "row1[1] (%d)", which);
  }
}

NX_TEST(attention_single_key_returns_v) {
  // Tk = 1: softmax over one key is 1 whatever q is, so out = v (per kv group)
  for (int64_t D : {8, 64, 80}) {
    const int64_t B = 2, Hq = 4, Hkv = 2;
    auto q = nxt::make({B, Hq, 1, D}, DType::F32), k = nxt::make({B, Hkv, 1, D}, DType::F32);
    auto v = nxt::make({B, Hkv, 1, D}, DType::F32);
    nxt::fill_random(q->v, -3, 3), nxt::fill_random(k->v, -3, 3), nxt::fill_random(v->v);
    for (int which = 0; which < 2; which++) {
      auto out = nxt::make({B, Hq, 1, D}, DType::F32);
      if (which == 0) nx::ref::attention(q->v, k->v, v->v, nullptr, 0.125f, out->v);
      else nx::fast::attention(q->v, k->v, v->v, nullptr, 0.125f, out->v);
      for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < Hq; h++)
          for (int64_t d = 0; d < D; d++)  // exact: weight 1.0 times v, divided by sum 1.0
            NX_EXPECT(get(out->v, {b, h, 0, d}) == get(v->v, {b, h / 2, 0, d}), "b%lld h%lld d%lld (%d)",
                      (long long)b, (long long)h, (long long)d, which);
    }
  }
}

NX_TEST(attention_fully_masked_row_is_zero) {
  const int64_t B = 2, H = 2, Tq = 1, Tk = 40, D = 64;
  auto q = nxt::make({B, H, Tq, D}, DType::F32), k = nxt::make({B, H, Tk, D}, DType::F32);
  auto v = nxt::make({B, H, Tk, D}, DType::F32), m = nxt::make({B, Tk}, DType::BOOL);
  nxt::fill_random(q->v), nxt::fill_random(k->v), nxt::fill_random(v->v);
  for (int64_t j = 0; j < Tk; j++) m->v.ptr<uint8_t>()[Tk + j] = 1;  // batch 0: all padding; batch 1: none
  for (int which = 0; which < 2; which++) {
    auto out = nxt::make({B, H, Tq, D}, DType::F32);
    nxt::fill_random(out->v);  // the kernel must overwrite with zeros
    if (which == 0) nx::ref::attention(q->v, k->v, v->v, &m->v, 0.125f, out->v);
    else nx::fast::attention(q->v, k->v, v->v, &m->v, 0.125f, out->v);
    NX_EXPECT(!any_nan(out->v), "NaN in output (%d)", which);
    for (int64_t h = 0; h < H; h++)
      for (int64_t d = 0; d < D; d++) NX_EXPECT(get(out->v, {0, h, 0, d}) == 0.0f, "not zero (%d)", which);
  }
}

NX_TEST(attention_ref_gqa_equals_repeated_kv) {
  // Hq = 8 over Hkv = 2 must equal plain attention with each kv head repeated for its 4 query heads.
  const int64_t B = 1, Hq = 8, Hkv = 2, Tq = 3, Tk = 7, D = 8;
  auto q = nxt::make({B, Hq, Tq, D}, DType::F32), k = nxt::make({B, Hkv, Tk, D}, DType::F32);
  auto v = nxt::make({B, Hkv, Tk, D}, DType::F32);
  nxt::fill_random(q->v), nxt::fill_random(k->v), nxt::fill_random(v->v);
  auto kr = nxt::make({B, Hq, Tk, D}, DType::F32), vr = nxt::make({B, Hq, Tk, D}, DType::F32);
  for (int64_t h = 0; h < Hq; h++)
    for (int64_t j = 0; j < Tk; j++)
      for (int64_t d = 0; d < D; d++) {
        set(kr->v, {0, h, j, d}, get(k->v, {0, h / 4, j, d}));
        set(vr->v, {0, h, j, d}, get(v->v, {0, h / 4, j, d}));
      }
  auto o1 = nxt::make({B, Hq, Tq, D}, DType::F32), o2 = nxt::make({B, Hq, Tq, D}, DType::F32);
  nx::ref::attention(q->v, k->v, v->v, nullptr, 0.35f, o1->v);
  nx::ref::attention(q->v, kr->v, vr->v, nullptr, 0.35f, o2->v);
  nxt::allclose(o1->v, o2->v, 0, 0, "gqa vs repeated kv");  // exact: identical arithmetic
}

NX_TEST(attention_masked_keys_do_not_matter) {
  // Left padding: changing padded keys/values (and keys after the causal limit) leaves the output alone.
  const int64_t B = 2, H = 2, Tq = 3, Tk = 20, D = 64;
  auto q = nxt::make({B, H, Tq, D}, DType::F32), k = nxt::make({B, H, Tk, D}, DType::F32);
  auto v = nxt::make({B, H, Tk, D}, DType::F32), m = nxt::make({B, Tk}, DType::I64);
  nxt::fill_random(q->v), nxt::fill_random(k->v), nxt::fill_random(v->v);
  const int64_t pad[2] = {0, 6};
  for (int64_t b = 0; b < B; b++)
    for (int64_t j = 0; j < Tk; j++) m->v.ptr<int64_t>()[b * Tk + j] = j >= pad[b];
  for (int which = 0; which < 2; which++) {
    auto o1 = nxt::make({B, H, Tq, D}, DType::F32), o2 = nxt::make({B, H, Tq, D}, DType::F32);
    auto run = [&](const KView& out) {
      if (which == 0) nx::ref::attention(q->v, k->v, v->v, &m->v, 0.125f, out);
      else nx::fast::attention(q->v, k->v, v->v, &m->v, 0.125f, out);
    };
    run(o1->v);
    for (int64_t h = 0; h < H; h++)
      for (int64_t d = 0; d < D; d++)
        for (int64_t j = 0; j < pad[1]; j++) {
          set(k->v, {1, h, j, d}, 50.0f);
          set(v->v, {1, h, j, d}, 1000.0f);
        }
    run(o2->v);
    nxt::allclose(o2->v, o1->v, 0, 0, which == 0 ? "ref padding" : "fast padding");  // exact: keys skipped
    nxt::fill_random(k->v), nxt::fill_random(v->v);
  }
}

// ---------------------------------------------------------------------------------------------------
// attention: fast vs ref
// ---------------------------------------------------------------------------------------------------
namespace {

struct AttnCase {
  int64_t B, Hq, Hkv, Tq, Tk, D;
  DType dt;          // q/k/v dtype
  Layout qlay;       // q layout
  bool cache;        // k/v as windows of a bigger [B, Hkv, maxT, D] cache
  int mask;          // 0: none; 1: left padding (row 0 unpadded, row 1 padded, a third row fully
                     // padded); 2: a masked gap of keys [64, 128) in the middle (a whole key block)
  float scale;
};

void run_case(const AttnCase& c) {
  auto q = nxt::make({c.B, c.Hq, c.Tq, c.D}, c.dt, c.qlay);
  nxt::fill_random(q->v);
  std::shared_ptr<nxt::Buf> kb, vb;
  KView k, v;
  if (c.cache) {
    const int64_t maxT = c.Tk + 37;
    kb = nxt::make({c.B, c.Hkv, maxT, c.D}, c.dt), vb = nxt::make({c.B, c.Hkv, maxT, c.D}, c.dt);
    nxt::fill_random(kb->v), nxt::fill_random(vb->v);
    k = narrow(kb->v, 2, 5, c.Tk), v = narrow(vb->v, 2, 5, c.Tk);  // starts mid-buffer: unaligned rows
  } else {
    kb = nxt::make({c.B, c.Hkv, c.Tk, c.D}, c.dt, Layout::Contiguous);
    vb = nxt::make({c.B, c.Hkv, c.Tk, c.D}, c.dt, c.dt == DType::F32 ? Layout::Strided : Layout::Contiguous);
    nxt::fill_random(kb->v), nxt::fill_random(vb->v);
    k = kb->v, v = vb->v;
  }
  std::shared_ptr<nxt::Buf> m;
  if (c.mask) {
    m = nxt::make({c.B, c.Tk}, DType::BOOL);
    for (int64_t b = 0; b < c.B; b++) {
      const int64_t pad = b == 0 ? 0 : b == 1 ? std::min<int64_t>(c.Tk - 1, 1 + c.Tk / 3) : c.Tk;
      for (int64_t j = 0; j < c.Tk; j++)
        m->v.ptr<uint8_t>()[b * c.Tk + j] = c.mask == 1 ? j >= pad : (j < 64 || j >= 128);
    }
  }
  auto o1 = nxt::make({c.B, c.Hq, c.Tq, c.D}, DType::F32);
  auto o2 = nxt::make({c.B, c.Hq, c.Tq, c.D}, DType::F32, c.Tq % 2 ? Layout::Contiguous : Layout::Transposed);
  nx::ref::attention(q->v, k, v, m ? &m->v : nullptr, c.scale, o1->v);
  nx::fast::attention(q->v, k, v, m ? &m->v : nullptr, c.scale, o2->v);
  char what[200];
  std::snprintf(what, sizeof what, "attn %s B=%lld Hq=%lld Hkv=%lld Tq=%lld Tk=%lld D=%lld cache=%d mask=%d scale=%g",
                nx::dtype_name(c.dt), (long long)c.B, (long long)c.Hq, (long long)c.Hkv, (long long)c.Tq,
                (long long)c.Tk, (long long)c.D, c.cache, c.mask, c.scale);
  // Outputs are convex combinations of |v| <= 1. ref accumulates in double; fast in f32: scores carry
  // ~1e-6 relative error (f32 dot of D terms, pre-scaled q), exp16 ~1e-7, the f32 P.V sum over up to
  // ~1000 keys ~1e-6. Scores are |q.k| * scale <= D * scale; with scale = 1 (sharp softmax, scores up
  // to ~40) a 1e-6 relative score error becomes ~4e-5 in the weights, hence the larger atol there.
  // bf16/f16 inputs: both kernels widen the same stored values, so the same bounds apply.
  const double atol = c.scale >= 1.0f ? 2e-4 : 2e-5;
  nxt::allclose(o2->v, o1->v, atol, 1e-4, what);
  NX_EXPECT(!any_nan(o2->v), "%s: NaN", what);
}

}  // namespace

NX_TEST(attention_fast_vs_ref_shapes) {
  int n = 0;
  for (int64_t D : {8, 64, 80, 128})
    for (int64_t G : {1, 2, 4, 8})
      for (auto tt : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {3, 3}, {1, 17}, {3, 17}, {17, 17}, {1, 129},
                                                               {17, 129}, {129, 129}}) {
        AttnCase c{};
        c.B = (n % 3 == 0) ? 2 : 1;
        c.Hkv = (n % 2) ? 2 : 1;
        c.Hq = c.Hkv * G;
        c.Tq = tt.first;
        c.Tk = tt.second;
        c.D = D;
        c.dt = DType::F32;
        c.qlay = n % 4 == 1 ? Layout::Strided : n % 4 == 3 ? Layout::Transposed : Layout::Contiguous;
        c.cache = n % 2 == 0;
        c.mask = n % 5 < 2 ? 1 : 0;
        c.scale = 1.0f / std::sqrt(static_cast<float>(D));
        // keep the O(Tq Tk D Hq) reference affordable
        if (c.Tq == 129 && G * c.Hkv * D > 256) c.Hkv = 1, c.Hq = std::min<int64_t>(G, 2);
        run_case(c);
        n++;
      }
}

NX_TEST(attention_fast_vs_ref_dtypes_masks) {
  for (DType dt : {DType::F32, DType::BF16, DType::F16})
    for (int64_t D : {64, 80})
      for (bool cache : {false, true}) {
        // B = 3: row 0 unpadded, row 1 left-padded, row 2 fully padded (zeros)
        run_case({3, 8, 2, 3, 17, D, dt, Layout::Contiguous, cache, 1, 0.125f});
        run_case({3, 4, 4, 1, 129, D, dt, Layout::Strided, cache, 1, 0.125f});
        run_case({2, 4, 1, 17, 40, D, dt, Layout::Transposed, cache, 1, 1.0f});  // sharp softmax
      }
}

NX_TEST(attention_fast_vs_ref_unaligned_cache_and_gaps) {
  // Tk - Tq not a multiple of 4 or 16: a tile of query rows straddles a key-block boundary, so some rows
  // of a tile see none of a block while others do. Gap masks: rows see block 0, then a fully masked block.
  for (int64_t G : {1, 2, 4})
    for (auto tt : std::vector<std::pair<int64_t, int64_t>>{{17, 70}, {33, 99}, {6, 131}, {3, 200}})
      for (int mask : {0, 2}) {
        run_case({1, 2 * G, 2, tt.first, tt.second, 64, DType::F32, Layout::Contiguous, true, mask, 0.125f});
        run_case({2, G, 1, tt.first, tt.second, 80, DType::BF16, Layout::Strided, false, mask, 0.125f});
      }
}

NX_TEST(attention_fast_vs_ref_long_decode_splits) {
  // Few (b, kv head) tasks and long Tk: the fast kernel splits keys across threads and merges.
  run_case({1, 8, 1, 1, 1000, 64, DType::F32, Layout::Contiguous, true, 0, 0.125f});
  run_case({1, 4, 1, 1, 2048, 128, DType::BF16, Layout::Contiguous, true, 1, 0.0884f});
  run_case({1, 2, 1, 3, 777, 80, DType::F32, Layout::Contiguous, true, 1, 0.11f});     // causal + splits
  run_case({1, 4, 1, 2, 900, 64, DType::F32, Layout::Contiguous, true, 2, 0.125f});    // gap + splits
  run_case({2, 8, 8, 1, 1024, 64, DType::F32, Layout::Contiguous, true, 1, 0.125f});   // many tasks
  run_case({1, 32, 8, 1, 1024, 64, DType::F16, Layout::Contiguous, true, 0, 0.125f});  // bench shape
  // K + V = 41 MB, more than a 32 MiB last-level cache: the tile path prefetches the next key block
  // (a hint only: the results must be those of the plain path, within the same bound)
  run_case({1, 4, 4, 1, 20000, 64, DType::F32, Layout::Contiguous, true, 1, 0.125f});
  // D beyond the register tiles (D > 128 takes the row-by-row P.V path), with a ragged tail
  run_case({1, 4, 2, 3, 40, 256, DType::F32, Layout::Contiguous, true, 1, 0.0625f});
  run_case({1, 4, 1, 5, 33, 200, DType::BF16, Layout::Strided, false, 2, 0.07f});
}

NX_TEST(attention_fast_vs_ref_lane_path) {
  // Tasks with at least 8 query rows (query positions x heads of one kv head) take the lane path: 8 rows
  // in the lanes of a vector, one FMA per (key, dim) with the key element broadcast, softmax statistics
  // of 8 rows as one vector, P.V reading p at key stride 8. Covered here:
  //  - GQA decode with G = 8 (one row group), 16 (two), 12 (a half-filled second group, padded lanes);
  //  - G = 1, 2, 3, 4 with Tq large enough for >= 8 rows: rows of one task at different query positions,
  //    so the causal limit differs between lanes (and Tk - Tq not a multiple of 8 or 16);
  //  - Tk = 1, 7 (fewer keys than one group of 8: the copied, zero-padded last group), 8, 9, 31, 130;
  //  - padding masks (B = 3: unpadded, left-padded and fully padded rows -> zeros) and a masked gap;
  //  - f32 / bf16 / f16 K/V (bf16 / f16 widened into scratch), windows of a bigger cache (unaligned
  //    rows), strided V (copied to dense f32 first), q in every layout;
  //  - D = 8 (only the per-dim tail loop of the score kernel), 64, 80 (16-wide loop + tail), 200
  //    (row-by-row P.V).
  // Tolerance: run_case's (atol 2e-5, 2e-4 for scale 1; rtol 1e-4). The lane path sums each dot product
  // in one f32 accumulator in d order instead of 16 partial sums; its rounding grows like
  // sqrt(D) * eps * scale * sum_d |q_d k_d| ~ 1e-6 for these inputs (|q|, |k| <= 1), far inside the
  // bound, and the softmax and P.V arithmetic is the same f32 as the tile path's.
  const DType dts[3] = {DType::F32, DType::BF16, DType::F16};
  int n = 0;
  for (int64_t G : {8, 16, 12})
    for (int64_t Tk : {1, 7, 8, 9, 31, 130}) {
      const bool cache = n % 2 == 0;
      const int mask = Tk > 128 ? (n % 3) : (n % 3 == 0 ? 1 : 0);
      run_case({mask == 1 ? 3 : 1, G * (n % 2 ? 2 : 1), n % 2 ? 2 : 1, 1, Tk, 64, dts[n % 3],
                n % 4 == 1 ? Layout::Strided : Layout::Contiguous, cache, mask, 0.125f});
      n++;
    }
  for (auto gt : std::vector<std::pair<int64_t, int64_t>>{{1, 8}, {1, 13}, {2, 4}, {2, 5}, {3, 3}, {4, 2}, {4, 3}})
    for (int64_t extra : {0, 5, 40})
      for (int64_t D : {8, 64, 80}) {
        const int64_t G = gt.first, Tq = gt.second, Tk = Tq + extra;
        run_case({n % 3 == 0 ? 3 : 1, 2 * G, 2, Tq, Tk, D, dts[n % 3],
                  n % 3 == 1 ? Layout::Transposed : Layout::Contiguous, n % 2 == 0, n % 3 == 0 ? 1 : 0,
                  1.0f / std::sqrt(static_cast<float>(D))});
        n++;
      }
  run_case({2, 8, 1, 1, 40, 200, DType::F32, Layout::Contiguous, true, 1, 0.07f});     // D > 128
  run_case({1, 16, 2, 2, 50, 200, DType::BF16, Layout::Strided, false, 0, 0.07f});
  run_case({3, 8, 1, 1, 40, 64, DType::F32, Layout::Contiguous, true, 1, 1.0f});       // sharp softmax
  run_case({1, 12, 1, 3, 150, 64, DType::F16, Layout::Contiguous, false, 2, 1.0f});    // gap, sharp
}

NX_TEST(attention_fast_vs_ref_lane_path_splits_and_threads) {
  // Long decode with few (b, kv head) tasks: keys split across tasks, the last task of a group to finish
  // merges the partial (m, l, acc) triples. Tasks are claimed from per-thread ranges, so with 1, 2 and 3
  // threads (3 > cores: oversubscribed, a thread can be descheduled mid-call and have its range finished
  // by another) the merge happens in a different order and thread each time; results must not change
  // beyond run_case's tolerance (same reasoning as attention_fast_vs_ref_lane_path).
  const int restore = nx::num_threads();
  for (int t : {1, 2, 3}) {
    nx::set_num_threads(t);
    run_case({1, 8, 1, 1, 1000, 64, DType::F32, Layout::Contiguous, true, 0, 0.125f});   // llama-like, one kv head
    run_case({1, 32, 4, 1, 1024, 64, DType::F32, Layout::Contiguous, true, 0, 0.125f});  // the bench shape
    run_case({3, 16, 2, 1, 777, 80, DType::BF16, Layout::Contiguous, true, 1, 0.11f});   // padding + splits
    run_case({1, 8, 1, 2, 900, 64, DType::F16, Layout::Contiguous, true, 2, 0.125f});    // causal, gap, splits
    run_case({1, 24, 2, 1, 513, 64, DType::F32, Layout::Contiguous, false, 0, 0.125f});  // G = 12, odd Tk
  }
  nx::set_num_threads(restore);
}
