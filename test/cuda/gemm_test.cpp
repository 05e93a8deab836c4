// gemm_test.cpp: nx::cuda::gemm against nx::ref::gemm (kernels/cpu/gemm.h), through cuBLAS (when it can
// be loaded here; the runner's first line says) and through the fallback tiled kernel: decode (M = 1)
// and prefill shapes, odd sizes, K = 0, both weight layouts (row-major [K, N] and the transposed view of
// an nn.Linear [N, K] weight), a b with no unit stride, stride-0 broadcasts, f32 / bf16 / f16 weights and
// bias, strided a and out.
#include <string>
#include <vector>

#include "../../kernels/cpu/gemm.h"
#include "../../kernels/cuda/cuda.h"
#include "harness.h"

using nx::DType;
using nxc::Layout;

namespace {

// b as a [K, N] view: 0 row-major, 1 transposed view of [N, K] (stride(0) == 1), 2 every other column of
// a wider buffer (no unit stride after a transpose: strides [1, 2K+1]-like), 3 a [1, N] row broadcast over
// K (stride 0).
struct BView {
  nxc::BufP buf;
  nx::KView h, d;
};
BView make_b(int64_t K, int64_t N, DType dt, int kind) {
  BView r;
  switch (kind) {
    case 0:
      r.buf = nxc::make({K, N}, dt);
      break;
    case 1:
      r.buf = nxc::make({K, N}, dt, Layout::Transposed);
      break;
    case 2: {
      r.buf = nxc::make({N, K}, dt, Layout::Strided);  // [N, K] with stride 2 along K, then transposed
      nxc::fill_random(*r.buf, -1, 1);
      r.h = r.buf->h;
      r.d = r.buf->d;
      for (nx::KView* v : {&r.h, &r.d}) {
        std::swap(v->shape[0], v->shape[1]);
        std::swap(v->strides[0], v->strides[1]);
      }
      return r;
    }
    default:
      r.buf = nxc::make({1, N}, dt);
      nxc::fill_random(*r.buf, -1, 1);
      r.h = nxc::broadcast(r.buf->h, 0, K);
      r.d = nxc::broadcast(r.buf->d, 0, K);
      return r;
  }
  nxc::fill_random(*r.buf, -1, 1);
  r.h = r.buf->h;
  r.d = r.buf->d;
  return r;
}

}  // namespace

NXC_TEST(cuda_gemm_vs_ref) {
  std::string why;
  const bool blas = nx::cuda::cublas_available(&why);
  if (!blas) std::printf("  note: cuBLAS is not loadable here (%s): only the fallback kernel is tested\n", why.c_str());
  struct S {
    int64_t M, K, N;
  };
  const S shapes[] = {{1, 1, 1}, {1, 64, 33}, {7, 13, 5}, {3, 0, 4}, {64, 128, 96}, {130, 257, 65}, {1, 300, 17}, {17, 1, 9}};
  for (int path = 0; path < 2; path++) {
    if (path == 1 && !blas) continue;
    nx::cuda::set_gemm_path(path == 0 ? nx::cuda::GemmPath::KERNEL : nx::cuda::GemmPath::CUBLAS);
    for (const S& s : shapes) {
      for (DType db : {DType::F32, DType::BF16, DType::F16}) {
        for (int bk = 0; bk < 4; bk++) {
          const bool a_strided = nxc::rand_int(0, 3) == 0, a_bf16 = nxc::rand_int(0, 5) == 0;
          auto a = nxc::make({s.M, s.K}, a_bf16 ? DType::BF16 : DType::F32, a_strided ? Layout::Strided : Layout::Contiguous);
          nxc::fill_random(*a, -1, 1);
          BView b = make_b(s.K, s.N, db, bk);
          const int bias_kind = nxc::rand_int(0, 2);  // none, f32, like b
          nxc::BufP bias;
          if (bias_kind) {
            bias = nxc::make({s.N}, bias_kind == 1 ? DType::F32 : db, nxc::rand_int(0, 1) ? Layout::Contiguous : Layout::Strided);
            nxc::fill_random(*bias, -1, 1);
          }
          const Layout lo = nxc::rand_int(0, 3) == 0 ? Layout::Strided : Layout::Contiguous;
          auto want = nxc::make({s.M, s.N}, DType::F32, lo), got = nxc::clone(*want);
          nx::ref::gemm(a->h, b.h, bias ? &bias->h : nullptr, want->h);
          nx::cuda::gemm(a->d, b.d, bias ? &bias->d : nullptr, got->d);
          // Tolerance: f32 sums of K products in different orders (the reference adds in k order;
          // cuBLAS splits K; the kernel adds in k order but may fuse multiply-adds). Each order is
          // within K * 2^-24 * sum|a_k b_k| of the exact sum; with |a|, |b| <= 1 that is <= K^2 * 6e-8
          // in the worst case and ~sqrt(K) * 6e-8 typically. atol 2e-6 * K (5e-4 at K = 257) sits
          // between the two; a wrong element, stride or transpose moves outputs by ~1e-1.
          const double atol = 2e-6 * static_cast<double>(s.K > 0 ? s.K : 1);
          nxc::allclose(*got, *want, atol, 1e-6,
                        std::string(path ? "cublas" : "kernel") + " M" + std::to_string(s.M) + " K" + std::to_string(s.K) + " N" +
                            std::to_string(s.N) + " b " + nx::dtype_name(db) + " kind " + std::to_string(bk) + " bias " +
                            std::to_string(bias_kind) + (a_strided ? " a strided" : "") + (a_bf16 ? " a bf16" : "") +
                            (lo == Layout::Strided ? " out strided" : ""));
        }
      }
    }
  }
  nx::cuda::set_gemm_path(nx::cuda::GemmPath::AUTO);
}
