// norm_attention_test.cpp: nx::cuda rmsnorm / layernorm / rope / attention against nx::ref
// (kernels/cpu/norm.h, kernels/cpu/attention.h): odd sizes, rows longer than a block, strided and
// permuted views, f32 / bf16 / f16, partial rotary dims, KV-cache offsets, GQA and padding masks.
#include <string>
#include <vector>

#include "../../kernels/cpu/attention.h"
#include "../../kernels/cpu/norm.h"
#include "../../kernels/cuda/cuda.h"
#include "harness.h"

using nx::DType;
using nxc::Layout;

namespace {
const DType kFloat[] = {DType::F32, DType::F16, DType::BF16};

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); i++) r += (i ? "," : "") + std::to_string(s[i]);
  return r + "]";
}

// A [B, T, H, D] view permuted from a physical [B, H, T, D] buffer (the layout attention outputs
// and head splits produce), or a plain made view.
struct Perm {
  nxc::BufP buf;
  nx::KView h, d;
};
Perm bthd_from_bhtd(int64_t B, int64_t T, int64_t H, int64_t D, DType dt) {
  Perm p;
  p.buf = nxc::make({B, H, T, D}, dt);
  p.h = p.buf->h;
  p.d = p.buf->d;
  for (nx::KView* v : {&p.h, &p.d}) {
    std::swap(v->shape[1], v->shape[2]);
    std::swap(v->strides[1], v->strides[2]);
  }
  return p;
}
}  // namespace

NXC_TEST(cuda_norms_vs_ref) {
  const std::vector<std::vector<int64_t>> shapes = {{1}, {7}, {3, 5}, {4, 768}, {2, 3, 1000}, {0, 8}, {5, 1}, {3, 2049}};
  for (const auto& shape : shapes) {
    const int64_t D = shape.back();
    for (DType dx : kFloat) {
      for (DType dout : kFloat) {
        for (int wk = 0; wk < 4; wk++) {  // no weight, f32, bf16, f16 weight / bias
          const Layout lx = nxc::kLayouts[nxc::rand_int(0, 2)], lo = nxc::kLayouts[nxc::rand_int(0, 2)];
          auto x = nxc::make(shape, dx, lx);
          nxc::fill_random(*x, -2, 3);
          nxc::BufP w, b;
          if (wk) {
            const DType wd = wk == 1 ? DType::F32 : wk == 2 ? DType::BF16 : DType::F16;
            w = nxc::make({D}, wd, nxc::rand_int(0, 1) ? Layout::Contiguous : Layout::Strided);
            b = nxc::make({D}, wd);
            nxc::fill_random(*w, 0.5, 1.5);
            nxc::fill_random(*b, -1, 1);
          }
          for (int kind = 0; kind < 2; kind++) {
            auto want = nxc::make(shape, dout, lo), got = nxc::clone(*want);
            if (kind == 0) {
              nx::ref::rmsnorm(x->h, w ? &w->h : nullptr, 1e-6f, want->h);
              nx::cuda::rmsnorm(x->d, w ? &w->d : nullptr, 1e-6f, got->d);
            } else {
              nx::ref::layernorm(x->h, w ? &w->h : nullptr, b ? &b->h : nullptr, 1e-5f, want->h);
              nx::cuda::layernorm(x->d, w ? &w->d : nullptr, b ? &b->d : nullptr, 1e-5f, got->d);
            }
            // Tolerance: the reference's double arithmetic on both sides; the sums differ only in
            // order (relative error ~ D * 2^-53), so results agree to the final rounding: 1 f32 ulp
            // (a rounding tie may fall either way) plus one ulp of a narrow output; atol 1e-7 for
            // layernorm outputs near zero (x - mean cancels).
            const double rtol = nxc::ulp1(DType::F32) + nxc::ulp1(dout);
            std::string what = std::string(kind ? "layernorm" : "rmsnorm") + " " + shape_str(shape) + " x " + nx::dtype_name(dx) +
                               " w " + std::to_string(wk) + " out " + nx::dtype_name(dout);
            nxc::allclose(*got, *want, 1e-7, rtol, what);
          }
        }
      }
    }
  }
}

NXC_TEST(cuda_rope_vs_ref) {
  struct C {
    int64_t B, T, H, D, R;  // R: rotary dims (<= D)
  };
  const C cases[] = {{1, 1, 1, 2, 2}, {1, 5, 3, 8, 8}, {2, 7, 4, 64, 64}, {2, 3, 2, 64, 32}, {1, 9, 5, 10, 6}, {3, 1, 2, 128, 128}};
  for (const C& c : cases) {
    for (DType dx : kFloat) {
      for (bool inter : {false, true}) {
        for (DType dp : {DType::I32, DType::I64}) {
          const bool permuted = nxc::rand_int(0, 1);
          Perm xp = permuted ? bthd_from_bhtd(c.B, c.T, c.H, c.D, dx) : Perm{};
          nxc::BufP xb;
          if (!permuted) {
            xb = nxc::make({c.B, c.T, c.H, c.D}, dx, nxc::kLayouts[nxc::rand_int(0, 2)]);
            xp.buf = xb;
            xp.h = xb->h;
            xp.d = xb->d;
          }
          nxc::fill_random(*xp.buf, -2, 2);
          auto pos = nxc::make({c.B, c.T}, dp, nxc::rand_int(0, 1) ? Layout::Contiguous : Layout::Transposed);
          nxc::fill_random(*pos, 0, 4000);  // large positions: the f32 angle p * inv_freq must match bit for bit
          auto inv = nxc::make({c.R / 2}, DType::F32);
          for (int64_t i = 0; i < c.R / 2; i++)
            nx::store_f32(inv->h.data, DType::F32, i, static_cast<float>(std::pow(10000.0, -2.0 * i / c.R)));
          inv->upload();
          auto want = nxc::make({c.B, c.T, c.H, c.D}, dx, nxc::kLayouts[nxc::rand_int(0, 2)]), got = nxc::clone(*want);
          nx::ref::rope(xp.h, pos->h, inv->h, inter, want->h);
          nx::cuda::rope(xp.d, pos->d, inv->d, inter, got->d);
          // Tolerance: the same f32 angle, then cos / sin and the rotation in double on both sides
          // (CUDA's double cos / sin are within 1-2 ulp of double of glibc's): equal after rounding
          // except at ties: 1 f32 ulp + one ulp of a narrow output; atol 1e-7 near zero.
          nxc::allclose(*got, *want, 1e-7, nxc::ulp1(DType::F32) + nxc::ulp1(dx),
                        std::string("rope ") + shape_str({c.B, c.T, c.H, c.D}) + " R " + std::to_string(c.R) + " " +
                            nx::dtype_name(dx) + (inter ? " interleaved" : " half") + (permuted ? " permuted" : ""));
        }
      }
    }
  }
}

NXC_TEST(cuda_attention_vs_ref) {
  struct C {
    int64_t B, Hq, Hkv, Tq, Tk, D;
  };
  // prefill (Tq == Tk), decode (Tq = 1) and chunks against a cache, MHA and GQA, head dims from 1 to
  // past 128 (more than one accumulator per thread) and key counts past one 128-key chunk.
  const C cases[] = {{1, 1, 1, 1, 1, 1},     {1, 2, 2, 5, 5, 8},     {2, 4, 2, 3, 9, 16},   {1, 8, 1, 1, 300, 64},
                     {2, 4, 4, 17, 17, 64},  {1, 6, 2, 4, 130, 80},  {1, 2, 1, 2, 7, 200},  {1, 3, 3, 129, 129, 32}};
  for (const C& c : cases) {
    for (DType dkv : kFloat) {
      for (int mk = 0; mk < 3; mk++) {  // no mask, a padding mask, a mask that hides every key of a row
        // q as the [B, Hq, Tq, D] view of a [B, Tq, Hq, D] buffer (how models hand it over)
        auto qb = nxc::make({c.B, c.Tq, c.Hq, c.D}, nxc::rand_int(0, 2) ? DType::F32 : dkv);
        nxc::fill_random(*qb, -1, 1);
        nx::KView qh = qb->h, qd = qb->d;
        for (nx::KView* v : {&qh, &qd}) {
          std::swap(v->shape[1], v->shape[2]);
          std::swap(v->strides[1], v->strides[2]);
        }
        // k / v: the filled prefix [0, Tk) of a longer cache [B, Hkv, Tk + 3, D]
        auto kc = nxc::make({c.B, c.Hkv, c.Tk + 3, c.D}, dkv), vc = nxc::make({c.B, c.Hkv, c.Tk + 3, c.D}, dkv);
        nxc::fill_random(*kc, -1, 1);
        nxc::fill_random(*vc, -1, 1);
        nx::KView kh = kc->h, kd = kc->d, vh = vc->h, vd = vc->d;
        for (nx::KView* v : {&kh, &kd, &vh, &vd}) v->shape[2] = c.Tk;
        nxc::BufP mask;
        if (mk) {
          mask = nxc::make({c.B, c.Tk}, nxc::rand_int(0, 1) ? DType::I32 : DType::F32);
          nxc::fill_random(*mask, 1, 1);
          // left padding: the first keys of batch row 0 are padding
          for (int64_t j = 0; j < std::min<int64_t>(2, c.Tk - 1); j++) nxc::set_f(*mask, j, 0);
          if (mk == 2)  // every key of the last batch row hidden: its queries see nothing -> zeros
            for (int64_t j = 0; j < c.Tk; j++) nxc::set_f(*mask, (c.B - 1) * c.Tk + j, 0);
          // a NaN in a masked V slot must not leak
          if (c.Tk > 1) nxc::set_f(*vc, 0, NAN);
        }
        // out: the [B, Hq, Tq, D] view of a [B, Tq, Hq, D] f32 buffer (as ops.cpp allocates it)
        auto ob = nxc::make({c.B, c.Tq, c.Hq, c.D}, DType::F32), og = nxc::clone(*ob);
        nx::KView oh = ob->h, od = og->d;
        for (nx::KView* v : {&oh, &od}) {
          std::swap(v->shape[1], v->shape[2]);
          std::swap(v->strides[1], v->strides[2]);
        }
        const float scale = 1.0f / std::sqrt(static_cast<float>(c.D));
        nx::ref::attention(qh, kh, vh, mask ? &mask->h : nullptr, scale, oh);
        nx::cuda::attention(qd, kd, vd, mask ? &mask->d : nullptr, scale, od);
        // Tolerance: scores, softmax and P.V in f32 on the GPU where the reference uses double. The
        // dot product of D terms with |q|, |k| <= 1 is off by at most D * 2^-24 * sum|q_d k_d| (worst
        // case ~2e-3 at D = 200; typically ~1e-6), times scale = 1/sqrt(D); the weights inherit that
        // relative error and the output (a convex combination of |v| <= 1) as an absolute one: atol
        // 5e-5, rtol 1e-4 hold with a wide margin for these sizes, while a wrong key, head or mask
        // moves outputs by ~1e-1.
        nxc::allclose(*og, *ob, 5e-5, 1e-4,
                      "attention B" + std::to_string(c.B) + " Hq" + std::to_string(c.Hq) + " Hkv" + std::to_string(c.Hkv) + " Tq" +
                          std::to_string(c.Tq) + " Tk" + std::to_string(c.Tk) + " D" + std::to_string(c.D) + " kv " +
                          nx::dtype_name(dkv) + " mask " + std::to_string(mk));
      }
    }
  }
}
