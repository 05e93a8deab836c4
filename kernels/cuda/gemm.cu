// gemm.cu: out[M,N] = a[M,K] @ b[K,N] (+ bias[N]) on the GPU. Contract: kernels/cpu/gemm.h (and
// cuda.h); reference: nx::ref::gemm in kernels/cpu/gemm.cpp.
//
// cuBLAS is not linked: it is loaded at run time with dlopen (libcublas.so.13, then .12, then
// libcublas.so) and only cublasCreate_v2 / cublasSetStream_v2 / cublasSgemm_v2 are used (declared here,
// so no cuBLAS header is needed to build). One handle per device, bound to that device's stream.
// Row-major C = A B is computed as the column-major C^T = B^T A^T: an operand with a unit column stride
// is passed as is, one with a unit row stride as transposed (the nn.Linear weight viewed through .t()),
// with the row / column stride as leading dimension; anything else (bf16 / f16 data, stride-0
// broadcasts, no unit stride, sizes past int32) is first converted by the cast kernel into dense f32
// scratch (bf16 / f16 weights are therefore widened on every call: 6 bytes of traffic per weight
// instead of 2, a known cost). cuBLAS runs in its default math mode (full f32: no TF32 unless the
// process sets NVIDIA_TF32_OVERRIDE). The bias is added afterwards by a small kernel, after the f32 sum,
// as the reference adds it.
//
// The fallback (no cuBLAS, NX_CUBLAS=0, or set_gemm_path(KERNEL)): a 16 x 16 shared-memory tiled kernel
// that reads a and b of any dtype and strides directly and accumulates each output in f32 in k order
// (as the reference).
#include <dlfcn.h>

#include <climits>
#include <memory>
#include <cstdlib>
#include <mutex>

#include "common.cuh"
#include "dl.h"

namespace nx {
namespace cuda {

namespace {

// ---- cuBLAS, loaded at run time ----
using cublasHandle_t = void*;
using cublasStatus_t = int;           // CUBLAS_STATUS_SUCCESS = 0
using cublasOperation_t = int;        // CUBLAS_OP_N = 0, CUBLAS_OP_T = 1
constexpr cublasOperation_t kOpN = 0, kOpT = 1;
using CreateFn = cublasStatus_t (*)(cublasHandle_t*);
using SetStreamFn = cublasStatus_t (*)(cublasHandle_t, cudaStream_t);
using SgemmFn = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const float*,
                                   const float*, int, const float*, int, const float*, float*, int);

struct Cublas {
  bool ok = false;
  std::string why;
  std::string lib;
  CreateFn create = nullptr;
  SetStreamFn set_stream = nullptr;
  SgemmFn sgemm = nullptr;
};

const Cublas& cublas() {
  static const Cublas c = [] {
    Cublas r;
    const char* env = std::getenv("NX_CUBLAS");
    if (env != nullptr && env[0] == '0') {
      r.why = "disabled by NX_CUBLAS=0";
      return r;
    }
    std::string errors;
    const char* lib = dl::open_first(
        {"libcublas.so.13", "libcublas.so.12", "libcublas.so"},
        [&](void* h) {
          r.create = reinterpret_cast<CreateFn>(dlsym(h, "cublasCreate_v2"));
          r.set_stream = reinterpret_cast<SetStreamFn>(dlsym(h, "cublasSetStream_v2"));
          r.sgemm = reinterpret_cast<SgemmFn>(dlsym(h, "cublasSgemm_v2"));
          return r.create && r.set_stream && r.sgemm;
        },
        "cublasCreate_v2 / cublasSetStream_v2 / cublasSgemm_v2", errors);
    if (lib != nullptr) {
      r.ok = true;
      r.lib = lib;
      return r;
    }
    r.why = "cuBLAS could not be loaded (" + errors + ")";
    return r;
  }();
  return c;
}

std::mutex g_handle_mu;
cublasHandle_t g_handles[64] = {nullptr};
GemmPath g_path = GemmPath::AUTO;

// The current device's handle, bound to its stream (created on first use).
cublasHandle_t handle() {
  const int dev = current_device();
  std::lock_guard<std::mutex> lk(g_handle_mu);
  if (dev < 0 || dev >= 64) throw Error("DEVICE", "cuBLAS: device ordinal out of range");
  if (g_handles[dev] == nullptr) {
    cublasHandle_t h = nullptr;
    const cublasStatus_t s = cublas().create(&h);
    if (s != 0 || h == nullptr) throw Error("DEVICE", "cublasCreate failed with status " + std::to_string(s));
    const cublasStatus_t s2 = cublas().set_stream(h, stream());
    if (s2 != 0) throw Error("DEVICE", "cublasSetStream failed with status " + std::to_string(s2));
    g_handles[dev] = h;  // never destroyed: the handle lives as long as the process (as the stream)
  }
  return g_handles[dev];
}

// X [R, C] with element (r, c) at r*s0 + c*s1, as a column-major cuBLAS operand that equals X^T:
// op N with ld = s0 (unit column stride) or op T with ld = s1 (unit row stride). false when neither.
bool transposed_operand(int64_t R, int64_t C, int64_t s0, int64_t s1, cublasOperation_t* op, int64_t* ld) {
  if (C == 1) s1 = 1;                          // a single column: its stride is never stepped
  if (R == 1) s0 = C > 1 ? C : 1;              // a single row: likewise
  if (s1 == 1 && s0 >= (C > 1 ? C : 1) && s0 <= INT_MAX) {
    *op = kOpN;
    *ld = s0;
    return true;
  }
  if (s0 == 1 && s1 >= (R > 1 ? R : 1) && s1 <= INT_MAX) {
    *op = kOpT;
    *ld = s1;
    return true;
  }
  return false;
}

// ---- kernels ----
constexpr int kT = 16;

__global__ void gemm_tiled_kernel(KView a, KView b, KView bias, bool hb, KView o, int64_t M, int64_t N, int64_t K) {
  __shared__ float As[kT][kT + 1];
  __shared__ float Bs[kT][kT + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t tilesM = (M + kT - 1) / kT;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kT + tx;
  for (int64_t tm = blockIdx.y; tm < tilesM; tm += gridDim.y) {
    const int64_t i = tm * kT + ty;
    float acc = 0.0f;
    for (int64_t k0 = 0; k0 < K; k0 += kT) {
      const int64_t ka = k0 + tx, kb = k0 + ty;
      As[ty][tx] = (i < M && ka < K) ? load_f32(a.data, a.dtype, i * a.strides[0] + ka * a.strides[1]) : 0.0f;
      Bs[ty][tx] = (kb < K && j < N) ? load_f32(b.data, b.dtype, kb * b.strides[0] + j * b.strides[1]) : 0.0f;
      __syncthreads();
      const int64_t kn = K - k0 < kT ? K - k0 : kT;
      for (int64_t kk = 0; kk < kn; kk++) acc += As[ty][kk] * Bs[kk][tx];
      __syncthreads();
    }
    if (i < M && j < N) {
      if (hb) acc += load_f32(bias.data, bias.dtype, j * bias.strides[0]);
      store_f32(o.data, o.dtype, i * o.strides[0] + j * o.strides[1], acc);
    }
  }
}

__global__ void bias_kernel(KView o, KView bias, int64_t M, int64_t N) {
  NX_CUDA_LOOP(g, M * N) {
    const int64_t i = g / N, j = g % N;
    const int64_t off = i * o.strides[0] + j * o.strides[1];
    store_f32(o.data, o.dtype, off, load_f32(o.data, o.dtype, off) + load_f32(bias.data, bias.dtype, j * bias.strides[0]));
  }
}

void gemm_kernel_path(const KView& a, const KView& b, const KView* bias, const KView& out, int64_t M, int64_t N, int64_t K) {
  const int64_t tilesN = (N + kT - 1) / kT, tilesM = (M + kT - 1) / kT;
  if (tilesN > INT_MAX) throw Error("UNSUPPORTED", "matmul on CUDA: N too large for the fallback kernel");
  dim3 grid(static_cast<unsigned>(tilesN), static_cast<unsigned>(tilesM < 65535 ? tilesM : 65535));
  dim3 block(kT, kT);
  KView bv = bias ? *bias : KView{};
  gemm_tiled_kernel<<<grid, block, 0, stream()>>>(a, b, bv, bias != nullptr, out, M, N, K);
  check_launch("matmul (tiled kernel)");
}

// A 2-D view as a cuBLAS operand for X^T, converting into `scratch` (dense f32) when it cannot be used
// as is. Returns the device pointer.
const float* operand(const KView& x, int64_t R, int64_t C, std::unique_ptr<Scratch>& scratch, cublasOperation_t* op,
                     int64_t* ld) {
  if (x.dtype == DType::F32 && transposed_operand(R, C, x.strides[0], x.strides[1], op, ld))
    return static_cast<const float*>(x.data);
  scratch.reset(new Scratch(static_cast<size_t>(R * C) * sizeof(float)));
  const int64_t shape[2] = {R, C};
  KView d = dense_view(scratch->p, DType::F32, 2, shape);
  cast(x, d);
  *op = kOpN;
  *ld = C > 1 ? C : 1;
  return static_cast<const float*>(scratch->p);
}

}  // namespace

void set_gemm_path(GemmPath p) { g_path = p; }

bool cublas_available(std::string* why) {
  const Cublas& c = cublas();
  if (!c.ok && why) *why = c.why;
  return c.ok;
}

void gemm(const KView& a, const KView& b, const KView* bias, const KView& out) {
  const int64_t M = a.shape[0], K = a.shape[1], N = b.shape[1];
  if (M == 0 || N == 0) return;
  bool blas = g_path != GemmPath::KERNEL && cublas().ok;
  if (g_path == GemmPath::CUBLAS && !blas) throw Error("DEVICE", "matmul: " + cublas().why);
  if (M > INT_MAX || N > INT_MAX || K > INT_MAX || K == 0) blas = false;
  if (!blas) {
    gemm_kernel_path(a, b, bias, out, M, N, K);
    return;
  }
  std::unique_ptr<Scratch> sa, sb, sc;
  cublasOperation_t opa, opb;
  int64_t lda, ldb, ldc;
  const float* ap = operand(a, M, K, sa, &opa, &lda);
  const float* bp = operand(b, K, N, sb, &opb, &ldb);
  // C^T (N x M, column-major) must be written densely enough: unit column stride in out
  float* cp;
  KView c = out;
  cublasOperation_t opc;
  if (out.dtype == DType::F32 && transposed_operand(M, N, out.strides[0], out.strides[1], &opc, &ldc) && opc == kOpN) {
    cp = static_cast<float*>(out.data);
  } else {
    sc.reset(new Scratch(static_cast<size_t>(M * N) * sizeof(float)));
    const int64_t shape[2] = {M, N};
    c = dense_view(sc->p, DType::F32, 2, shape);
    cp = static_cast<float*>(sc->p);
    ldc = N > 1 ? N : 1;
  }
  const float one = 1.0f, zero = 0.0f;
  const cublasStatus_t s = cublas().sgemm(handle(), opb, opa, static_cast<int>(N), static_cast<int>(M), static_cast<int>(K),
                                          &one, bp, static_cast<int>(ldb), ap, static_cast<int>(lda), &zero, cp,
                                          static_cast<int>(ldc));
  if (s != 0) throw Error("DEVICE", "cublasSgemm failed with status " + std::to_string(s));
  if (bias) {
    bias_kernel<<<grid_for(M * N), kBlock, 0, stream()>>>(c, *bias, M, N);
    check_launch("matmul (bias)");
  }
  if (sc) cast(c, out);
}

}  // namespace cuda
}  // namespace nx
