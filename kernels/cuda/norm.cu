// norm.cu: RMSNorm and LayerNorm over the last dim on the GPU.
// Contract: kernels/cpu/norm.h; reference: nx::ref in kernels/cpu/norm.cpp.
//
// One block per row (all dims but the last), any strides and float dtypes. The reference's arithmetic
// in DOUBLE: sum of squares (rmsnorm) or the two-pass mean and centred variance (layernorm), each
// thread folding a strided share of the row and a shared-memory tree combining them; then every element
// is scaled in double and rounded once to out's dtype. Only the order of the additions differs from
// the reference.
#include <cmath>

#include "common.cuh"

namespace nx {
namespace cuda {

namespace {

constexpr int kNB = 256;

__device__ inline double block_sum(double v, double* sd) {
  const int t = threadIdx.x;
  sd[t] = v;
  __syncthreads();
  for (int s = kNB / 2; s > 0; s >>= 1) {
    if (t < s) sd[t] += sd[t + s];
    __syncthreads();
  }
  const double r = sd[0];
  __syncthreads();
  return r;
}

__device__ inline double param(const KView& p, bool has, int64_t i, double dflt) {
  return has ? static_cast<double>(load_f32(p.data, p.dtype, i * p.strides[0])) : dflt;
}

__global__ void norm_kernel(bool layer, Lines rw, KView x, KView w, bool hw, KView b, bool hb, float eps, KView o) {
  __shared__ double sd[kNB];
  const int t = threadIdx.x;
  const int64_t D = rw.n;
  for (int64_t r = blockIdx.x; r < rw.count; r += gridDim.x) {
    int64_t ox = 0, oo = 0;
    offsets_of(r, rw.nd, rw.shape, rw.sx, &ox, rw.so, &oo);
    double mean = 0.0, inv;
    if (layer) {
      double s = 0.0;
      for (int64_t i = t; i < D; i += kNB) s += load_f32(x.data, x.dtype, ox + i * rw.x_step);
      mean = block_sum(s, sd) / static_cast<double>(D);
      double v = 0.0;
      for (int64_t i = t; i < D; i += kNB) {
        const double d = load_f32(x.data, x.dtype, ox + i * rw.x_step) - mean;
        v += d * d;
      }
      const double var = block_sum(v, sd) / static_cast<double>(D);
      inv = 1.0 / sqrt(var + eps);
    } else {
      double ss = 0.0;
      for (int64_t i = t; i < D; i += kNB) {
        const double v = load_f32(x.data, x.dtype, ox + i * rw.x_step);
        ss += v * v;
      }
      inv = 1.0 / sqrt(block_sum(ss, sd) / static_cast<double>(D) + eps);
    }
    for (int64_t i = t; i < D; i += kNB) {
      const double v = load_f32(x.data, x.dtype, ox + i * rw.x_step);
      double y;
      if (layer)
        y = (v - mean) * inv * param(w, hw, i, 1.0) + param(b, hb, i, 0.0);
      else
        y = v * inv * param(w, hw, i, 1.0);
      store_f32(o.data, o.dtype, oo + i * rw.o_step, static_cast<float>(y));
    }
  }
}

void launch(bool layer, const KView& x, const KView* weight, const KView* bias, float eps, const KView& out) {
  const Lines rw = make_lines(x, x.ndim - 1, out);
  if (rw.count == 0 || rw.n == 0) return;
  KView w = weight ? *weight : KView{}, b = bias ? *bias : KView{};
  norm_kernel<<<grid_rows(rw.count), kNB, 0, stream()>>>(layer, rw, x, w, weight != nullptr, b, bias != nullptr, eps, out);
  check_launch(layer ? "layernorm" : "rmsnorm");
}

}  // namespace

void rmsnorm(const KView& x, const KView* weight, float eps, const KView& out) { launch(false, x, weight, nullptr, eps, out); }

void layernorm(const KView& x, const KView* weight, const KView* bias, float eps, const KView& out) {
  launch(true, x, weight, bias, eps, out);
}

}  // namespace cuda
}  // namespace nx
