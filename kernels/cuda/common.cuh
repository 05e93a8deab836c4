// kernels/cuda/common.cuh: what the .cu files share (internal to kernels/cuda).
//
// Host side: CUDA error checks that throw nx::Error{"DEVICE"}, the current device's stream, launch
// geometry, and the per-device "first bad element" slot that kernels use to report data-dependent
// errors. Device side: the dtype conversions and typed loads/stores are kernels/common.h's own (NX_HD: host and
// device), so a cast on the GPU rounds exactly as on the CPU; plus row-major index arithmetic over KViews (strides in elements, up to kMaxDims dims).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "../common.h"
#include "cuda.h"

namespace nx {
namespace cuda {

// ------------------------------------------------------------------------------------------------
// host helpers (runtime.cu)
// ------------------------------------------------------------------------------------------------
// Throws Error{"DEVICE"} "<what>: <CUDA error name>: <message>" when e is not cudaSuccess.
void check(cudaError_t e, const char* what);
// After a kernel launch: throws when the launch failed (bad configuration, no kernel image for this GPU).
void check_launch(const char* what);
// The current device's stream (created on first use; one per device, in-order).
cudaStream_t stream();
int current_device();

constexpr int kBlock = 256;
// Blocks for a grid-stride loop over n items (at least 1, at most 65535 * 32).
inline unsigned grid_for(int64_t n, int block = kBlock) {
  int64_t g = (n + block - 1) / block;
  if (g < 1) g = 1;
  if (g > 65535LL * 32) g = 65535LL * 32;
  return static_cast<unsigned>(g);
}
// Blocks when one block handles one item (row / line) in a grid-stride loop.
inline unsigned grid_rows(int64_t rows) {
  if (rows < 1) return 1;
  return static_cast<unsigned>(rows < 65535LL * 32 ? rows : 65535LL * 32);
}

// The bad-element slot: one int64 per device holding the smallest linear index a kernel flagged, or
// kNoBad. bad_reset() queues its reset; bad_first() waits for the stream and returns it.
constexpr long long kNoBad = 0x7fffffffffffffffLL;
long long* bad_slot();
void bad_reset();
long long bad_first();
// Reads element lin (row-major over v's shape) of a device view as int64 (waits for the stream).
int64_t read_index_at(const KView& v, int64_t lin);
// A dense device scratch buffer returned to the cache when it goes out of scope (stream order makes
// the reuse safe).
struct Scratch {
  void* p = nullptr;
  size_t n = 0;
  int dev = 0;
  explicit Scratch(size_t bytes);
  ~Scratch();
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// ------------------------------------------------------------------------------------------------
// device helpers
// ------------------------------------------------------------------------------------------------
__device__ inline void report_bad(long long* slot, int64_t lin) { atomicMin(slot, static_cast<long long>(lin)); }

// Copy one element between views (bit-exact when the dtypes agree; else through f32 or int64 as the
// CPU kernels' copy_elem).
__device__ inline void copy_elem(const void* src, DType st, int64_t so, void* dst, DType dt, int64_t dof) {
  if (st == dt) {
    switch (dtype_size(st)) {
      case 1: static_cast<uint8_t*>(dst)[dof] = static_cast<const uint8_t*>(src)[so]; break;
      case 2: static_cast<uint16_t*>(dst)[dof] = static_cast<const uint16_t*>(src)[so]; break;
      case 4: static_cast<uint32_t*>(dst)[dof] = static_cast<const uint32_t*>(src)[so]; break;
      default: static_cast<uint64_t*>(dst)[dof] = static_cast<const uint64_t*>(src)[so]; break;
    }
  } else if (dtype_is_float(dt) || dtype_is_float(st)) {
    store_f32(dst, dt, dof, load_f32(src, st, so));
  } else {
    store_i64(dst, dt, dof, load_i64(src, st, so));
  }
}

// The lines of x (and out, same shape) along `dim`: every other dim of size > 1 collapsed into a row-major
// index space of `count` lines; a line has `n` elements `step` apart. Kernels find a line's start with
// offsets_of(l, nd, shape, sx, &ox, so, &oo). (Rows of the last dim: make_lines(x, x.ndim - 1, out).)
struct Lines {
  int nd = 0;
  int64_t shape[kMaxDims] = {0};
  int64_t sx[kMaxDims] = {0}, so[kMaxDims] = {0};
  int64_t count = 1;
  int64_t n = 1;
  int64_t x_step = 0, o_step = 0;
};
inline Lines make_lines(const KView& x, int dim, const KView& out) {
  Lines ln;
  if (x.ndim == 0) return ln;
  ln.n = x.shape[dim];
  ln.x_step = x.strides[dim];
  ln.o_step = out.strides[dim];
  for (int d = 0; d < x.ndim; d++) {
    if (d == dim || x.shape[d] == 1) continue;
    ln.shape[ln.nd] = x.shape[d];
    ln.sx[ln.nd] = x.strides[d];
    ln.so[ln.nd] = out.strides[d];
    ln.count *= x.shape[d];
    ln.nd++;
  }
  return ln;
}

// Offsets in up to three views (sharing `shape`, rank nd) of row-major linear index lin.
__device__ inline void offsets_of(int64_t lin, int nd, const int64_t* shape, const int64_t* s0, int64_t* o0,
                                  const int64_t* s1 = nullptr, int64_t* o1 = nullptr, const int64_t* s2 = nullptr,
                                  int64_t* o2 = nullptr, const int64_t* s3 = nullptr, int64_t* o3 = nullptr) {
  int64_t a = 0, b = 0, c = 0, e = 0;
#pragma unroll
  for (int d = kMaxDims - 1; d >= 0; d--) {
    if (d < nd) {
      const int64_t n = shape[d];
      const int64_t i = lin % n;
      lin /= n;
      a += i * s0[d];
      if (s1) b += i * s1[d];
      if (s2) c += i * s2[d];
      if (s3) e += i * s3[d];
    }
  }
  *o0 = a;
  if (o1) *o1 = b;
  if (o2) *o2 = c;
  if (o3) *o3 = e;
}
// Multi-index of lin over shape (rank nd).
__device__ inline void unravel(int64_t lin, int nd, const int64_t* shape, int64_t* idx) {
#pragma unroll
  for (int d = kMaxDims - 1; d >= 0; d--) {
    if (d < nd) {
      idx[d] = lin % shape[d];
      lin /= shape[d];
    }
  }
}
__device__ inline int64_t dot_idx(int nd, const int64_t* idx, const int64_t* strides) {
  int64_t o = 0;
#pragma unroll
  for (int d = 0; d < kMaxDims; d++)
    if (d < nd) o += idx[d] * strides[d];
  return o;
}

// Grid-stride loop over [0, n).
#define NX_CUDA_LOOP(i, n) \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); i += static_cast<int64_t>(blockDim.x) * gridDim.x)

}  // namespace cuda
}  // namespace nx
