// test/cuda/sim/cuda_runtime.h: a CPU stand-in for the part of the CUDA runtime that kernels/cuda uses,
// so the CUDA kernels' logic (indexing, strides, reductions, barriers, error flags) can be executed and
// checked against the CPU references on a machine without a GPU. NOT a CUDA implementation: memory is
// host memory, "streams" run synchronously, math comes from the host libm (not CUDA's libdevice), and
// nothing about launch limits, occupancy or memory coherence is modelled. See test/cuda/sim/run.sh.
//
// Kernels run block after block; the threads of a block are ucontext coroutines on one OS thread that
// switch at __syncthreads (a barrier: every live thread of the block reaches it before any goes on).
// __shared__ becomes `static` (one block at a time, so statics are the block's shared memory).
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

using std::isinf;
using std::isnan;

#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
extern dim3 threadIdx, blockIdx, blockDim, gridDim;
void __syncthreads();
void* nx_sim_dynamic_smem();

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInsufficientDriver = 35,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
};
using cudaError = cudaError_t;
enum cudaMemcpyKind { cudaMemcpyHostToHost = 0, cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2, cudaMemcpyDeviceToDevice = 3 };
using cudaStream_t = struct nx_sim_stream*;
struct cudaDeviceProp {
  char name[256];
  int major, minor;
  size_t totalGlobalMem;
};

cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaGetLastError();
cudaError_t cudaRuntimeGetVersion(int* v);
cudaError_t cudaDriverGetVersion(int* v);
const char* cudaGetErrorName(cudaError_t e);
const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetDevice(int* d);
cudaError_t cudaSetDevice(int d);
cudaError_t cudaStreamCreate(cudaStream_t* s);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaMalloc(void** p, size_t n);
cudaError_t cudaFree(void* p);
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t s);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind k, cudaStream_t s);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d);

// Runs fn as every thread of every block of the grid (see above).
void nx_sim_run(dim3 grid, dim3 block, size_t smem, void (*tramp)(void*), void* fn);
template <typename F>
void nx_sim_launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, F&& f) {
  nx_sim_run(grid, block, smem, [](void* p) { (*static_cast<F*>(p))(); }, &f);
}

inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline long long atomicMin(long long* p, long long v) {
  long long old = *p;
  if (v < old) *p = v;
  return old;
}
