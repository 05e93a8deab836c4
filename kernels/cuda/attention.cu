// attention.cu: rotary position embeddings and causal grouped-query attention on the GPU.
// Contract: kernels/cpu/attention.h; reference: nx::ref in kernels/cpu/attention.cpp.
//
// rope: one thread per (b, t, pair i), looping over the heads: the angle is float(pos) * inv_freq[i] in
//   f32 exactly as the reference, cos / sin and the rotation in double as the reference, rounded once.
//   A second kernel copies the pass-through dims R..D.
// attention: a straightforward kernel, not flash attention. One block (128 threads) per query row
//   (b, h, i); the row of q is staged in shared memory. Pass 1: each thread takes keys j = t, t+128, ...
//   among the visible ones (j <= Tk - Tq + i, mask nonzero), computes q.k in f32 and keeps the max;
//   a block reduction gives the row max. Pass 2, over chunks of 128 keys: each thread recomputes one
//   key's score and its weight expf(s - max) into shared memory, then every thread accumulates
//   weight * v for its own head dims (d = t, t+128, ... : head_dim up to kAttentionMaxHeadDim).
//   out = acc / sum of weights. Masked / future keys get weight 0 and their V rows are never read (so
//   a NaN in a padded cache slot cannot leak). A row that sees no key writes zeros. Scores, weights and
//   sums are f32 where the reference uses double (the test's tolerance says how far that moves them).
#include <cmath>

#include "common.cuh"

namespace nx {
namespace cuda {

namespace {

__global__ void rope_rotate_kernel(KView x, KView pos, KView inv, bool interleaved, KView o, int64_t B, int64_t T, int64_t H,
                                   int64_t half) {
  const int64_t n = B * T * half;
  NX_CUDA_LOOP(g, n) {
    const int64_t i = g % half;
    const int64_t t = (g / half) % T;
    const int64_t b = g / (half * T);
    const float p = static_cast<float>(load_i64(pos.data, pos.dtype, b * pos.strides[0] + t * pos.strides[1]));
    const float ang = __fmul_rn(p, load_f32(inv.data, inv.dtype, i * inv.strides[0]));
    const double c = cos(static_cast<double>(ang)), s = sin(static_cast<double>(ang));
    const int64_t ia = interleaved ? 2 * i : i;
    const int64_t ib = interleaved ? 2 * i + 1 : i + half;
    for (int64_t h = 0; h < H; h++) {
      const int64_t xo = b * x.strides[0] + t * x.strides[1] + h * x.strides[2];
      const int64_t oo = b * o.strides[0] + t * o.strides[1] + h * o.strides[2];
      const double a = load_f32(x.data, x.dtype, xo + ia * x.strides[3]);
      const double bb = load_f32(x.data, x.dtype, xo + ib * x.strides[3]);
      store_f32(o.data, o.dtype, oo + ia * o.strides[3], static_cast<float>(a * c - bb * s));
      store_f32(o.data, o.dtype, oo + ib * o.strides[3], static_cast<float>(a * s + bb * c));
    }
  }
}

__global__ void rope_pass_kernel(KView x, KView o, int64_t B, int64_t T, int64_t H, int64_t R, int64_t D) {
  const int64_t rest = D - R;
  const int64_t n = B * T * H * rest;
  NX_CUDA_LOOP(g, n) {
    const int64_t d = R + g % rest;
    const int64_t h = (g / rest) % H;
    const int64_t t = (g / (rest * H)) % T;
    const int64_t b = g / (rest * H * T);
    const int64_t xo = b * x.strides[0] + t * x.strides[1] + h * x.strides[2] + d * x.strides[3];
    const int64_t oo = b * o.strides[0] + t * o.strides[1] + h * o.strides[2] + d * o.strides[3];
    store_f32(o.data, o.dtype, oo, load_f32(x.data, x.dtype, xo));
  }
}

constexpr int kAT = 128;                                     // threads per query row
constexpr int kAccPerThread = static_cast<int>(kAttentionMaxHeadDim / kAT);  // head dims per thread

__device__ inline float block_max(float v, float* red) {
  const int t = threadIdx.x;
  red[t] = v;
  __syncthreads();
  for (int s = kAT / 2; s > 0; s >>= 1) {
    if (t < s) red[t] = fmaxf(red[t], red[t + s]);
    __syncthreads();
  }
  const float r = red[0];
  __syncthreads();
  return r;
}
__device__ inline float block_sum(float v, float* red) {
  const int t = threadIdx.x;
  red[t] = v;
  __syncthreads();
  for (int s = kAT / 2; s > 0; s >>= 1) {
    if (t < s) red[t] += red[t + s];
    __syncthreads();
  }
  const float r = red[0];
  __syncthreads();
  return r;
}

struct AttnDims {
  int64_t B, Hq, Tq, D, Hkv, Tk, G;
};

__device__ inline bool visible(const KView& mask, bool hm, int64_t b, int64_t j) {
  return !hm || load_f32(mask.data, mask.dtype, b * mask.strides[0] + j * mask.strides[1]) != 0.0f;
}
__device__ inline float score(const float* qs, const KView& k, int64_t ko, int64_t D) {
  float dot = 0.0f;
  for (int64_t d = 0; d < D; d++) dot += qs[d] * load_f32(k.data, k.dtype, ko + d * k.strides[3]);
  return dot;
}

__global__ void attention_kernel(KView q, KView k, KView v, KView mask, bool hm, float scale, KView o, AttnDims z) {
  extern __shared__ float smem[];
  float* qs = smem;           // [D]
  float* ws = smem + z.D;     // [kAT] weights of the current chunk
  __shared__ float red[kAT];
  const int t = threadIdx.x;
  const int64_t rows = z.B * z.Hq * z.Tq;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t i = row % z.Tq;
    const int64_t h = (row / z.Tq) % z.Hq;
    const int64_t b = row / (z.Tq * z.Hq);
    const int64_t kh = h / z.G;
    const int64_t qpos = z.Tk - z.Tq + i;
    const int64_t nvis = qpos + 1 < z.Tk ? qpos + 1 : z.Tk;  // keys 0..qpos
    const int64_t qo = b * q.strides[0] + h * q.strides[1] + i * q.strides[2];
    const int64_t kbase = b * k.strides[0] + kh * k.strides[1];
    const int64_t vbase = b * v.strides[0] + kh * v.strides[1];
    const int64_t oo = b * o.strides[0] + h * o.strides[1] + i * o.strides[2];
    for (int64_t d = t; d < z.D; d += kAT) qs[d] = load_f32(q.data, q.dtype, qo + d * q.strides[3]);
    __syncthreads();
    // pass 1: the row max over visible keys
    float mx = -INFINITY;
    for (int64_t j = t; j < nvis; j += kAT) {
      if (!visible(mask, hm, b, j)) continue;
      mx = fmaxf(mx, score(qs, k, kbase + j * k.strides[2], z.D) * scale);
    }
    mx = block_max(mx, red);
    if (mx == -INFINITY) {  // no key visible (or every score -inf): zeros, as the reference
      for (int64_t d = t; d < z.D; d += kAT) store_f32(o.data, o.dtype, oo + d * o.strides[3], 0.0f);
      __syncthreads();
      continue;
    }
    // pass 2: weights chunk by chunk, accumulated into this thread's head dims
    float acc[kAccPerThread];
#pragma unroll
    for (int r = 0; r < kAccPerThread; r++) acc[r] = 0.0f;
    float sum = 0.0f;
    for (int64_t j0 = 0; j0 < nvis; j0 += kAT) {
      const int64_t j = j0 + t;
      float w = 0.0f;
      if (j < nvis && visible(mask, hm, b, j)) w = expf(score(qs, k, kbase + j * k.strides[2], z.D) * scale - mx);
      ws[t] = w;
      sum += w;
      __syncthreads();
      const int64_t cnt = nvis - j0 < kAT ? nvis - j0 : kAT;
      for (int64_t jj = 0; jj < cnt; jj++) {
        const float wj = ws[jj];
        if (wj == 0.0f) continue;  // uniform across the block
        const int64_t vo = vbase + (j0 + jj) * v.strides[2];
#pragma unroll
        for (int r = 0; r < kAccPerThread; r++) {
          const int64_t d = t + static_cast<int64_t>(r) * kAT;
          if (d < z.D) acc[r] += wj * load_f32(v.data, v.dtype, vo + d * v.strides[3]);
        }
      }
      __syncthreads();
    }
    sum = block_sum(sum, red);
#pragma unroll
    for (int r = 0; r < kAccPerThread; r++) {
      const int64_t d = t + static_cast<int64_t>(r) * kAT;
      if (d < z.D) store_f32(o.data, o.dtype, oo + d * o.strides[3], acc[r] / sum);
    }
    __syncthreads();
  }
}

}  // namespace

void rope(const KView& x, const KView& pos, const KView& inv_freq, bool interleaved, const KView& out) {
  const int64_t B = x.shape[0], T = x.shape[1], H = x.shape[2], D = x.shape[3];
  const int64_t half = inv_freq.shape[0], R = 2 * half;
  if (B == 0 || T == 0 || H == 0) return;
  if (half > 0) {
    rope_rotate_kernel<<<grid_for(B * T * half), kBlock, 0, stream()>>>(x, pos, inv_freq, interleaved, out, B, T, H, half);
    check_launch("rope");
  }
  if (D > R) {
    rope_pass_kernel<<<grid_for(B * T * H * (D - R)), kBlock, 0, stream()>>>(x, out, B, T, H, R, D);
    check_launch("rope (pass-through dims)");
  }
}

void attention(const KView& q, const KView& k, const KView& v, const KView* mask, float scale, const KView& out) {
  AttnDims z;
  z.B = q.shape[0];
  z.Hq = q.shape[1];
  z.Tq = q.shape[2];
  z.D = q.shape[3];
  z.Hkv = k.shape[1];
  z.Tk = k.shape[2];
  z.G = z.Hkv > 0 ? z.Hq / z.Hkv : 1;
  if (z.D > kAttentionMaxHeadDim)
    throw Error("UNSUPPORTED", "attention on CUDA supports head_dim up to " + std::to_string(kAttentionMaxHeadDim) +
                                   ", got " + std::to_string(z.D));
  const int64_t rows = z.B * z.Hq * z.Tq;
  if (rows == 0 || z.D == 0) return;
  const size_t smem = static_cast<size_t>(z.D + kAT) * sizeof(float);
  KView m = mask ? *mask : KView{};
  attention_kernel<<<grid_rows(rows), kAT, smem, stream()>>>(q, k, v, m, mask != nullptr, scale, out, z);
  check_launch("attention");
}

}  // namespace cuda
}  // namespace nx
