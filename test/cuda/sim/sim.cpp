// sim.cpp: the CPU stand-in's runtime (see cuda_runtime.h).
#include <setjmp.h>
#include <ucontext.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda_runtime.h"

dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace {
// Threads are persistent coroutines: created once (ucontext, for their own stacks), then switched with
// _setjmp / _longjmp, which make no system calls (swapcontext saves the signal mask with one each time).
struct Thread {
  ucontext_t uc;
  jmp_buf env;
  std::vector<char> stack;
  bool started = false;
  bool done = true;
};
jmp_buf g_sched;
std::vector<Thread> g_threads;
int g_cur = -1;
void (*g_tramp)(void*) = nullptr;
void* g_fn = nullptr;
std::vector<unsigned char> g_smem;
int g_device = 0;
struct nx_sim_stream_impl {};

void yield_to_scheduler() {
  if (!_setjmp(g_threads[g_cur].env)) _longjmp(g_sched, 1);
}

void entry() {
  for (;;) {  // one kernel body per block, forever
    g_tramp(g_fn);
    g_threads[g_cur].done = true;
    yield_to_scheduler();
  }
}

void resume(int i) {
  g_cur = i;
  Thread& t = g_threads[i];
  if (!_setjmp(g_sched)) {
    if (!t.started) {
      t.started = true;
      setcontext(&t.uc);
    }
    _longjmp(t.env, 1);
  }
}
}  // namespace

void __syncthreads() {
  if (g_cur < 0) std::abort();
  yield_to_scheduler();
}

void* nx_sim_dynamic_smem() { return g_smem.data(); }

void nx_sim_run(dim3 grid, dim3 block, size_t smem, void (*tramp)(void*), void* fn) {
  const int nt = static_cast<int>(block.x * block.y * block.z);
  if (nt <= 0 || nt > 1024) std::abort();
  g_tramp = tramp;
  g_fn = fn;
  gridDim = grid;
  blockDim = block;
  g_smem.assign(smem + 16, 0xff);  // uninitialized shared memory reads show up as NaN / garbage
  g_threads.reserve(1024);  // never reallocated: a ucontext_t points into itself
  while (static_cast<int>(g_threads.size()) < nt) {
    g_threads.emplace_back();
    Thread& t = g_threads.back();
    t.stack.resize(256 * 1024);
    getcontext(&t.uc);
    t.uc.uc_stack.ss_sp = t.stack.data();
    t.uc.uc_stack.ss_size = t.stack.size();
    t.uc.uc_link = nullptr;
    makecontext(&t.uc, entry, 0);
  }
  for (unsigned bz = 0; bz < grid.z; bz++)
    for (unsigned by = 0; by < grid.y; by++)
      for (unsigned bx = 0; bx < grid.x; bx++) {
        blockIdx = dim3(bx, by, bz);
        for (int i = 0; i < nt; i++) g_threads[i].done = false;
        // rounds: run every live thread up to its next barrier (or its end)
        for (bool live = true; live;) {
          live = false;
          for (int i = 0; i < nt; i++) {
            if (g_threads[i].done) continue;
            live = true;
            threadIdx = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
            resume(i);
          }
        }
        g_cur = -1;
      }
}

cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
cudaError_t cudaGetLastError() { return cudaSuccess; }
cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = 13000;
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}
const char* cudaGetErrorName(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "cudaErrorSim"; }
const char* cudaGetErrorString(cudaError_t) { return "simulated error"; }
cudaError_t cudaGetDevice(int* d) {
  *d = g_device;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) {
  if (d != 0) return cudaErrorInvalidDevice;
  g_device = d;
  return cudaSuccess;
}
cudaError_t cudaStreamCreate(cudaStream_t* s) {
  *s = reinterpret_cast<cudaStream_t>(new nx_sim_stream_impl());
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaMalloc(void** p, size_t n) {
  *p = std::malloc(n ? n : 1);
  if (*p) std::memset(*p, 0xa5, n);  // fresh device memory is garbage
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind, cudaStream_t) {
  std::memmove(dst, src, n);
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) {
  std::memset(p, 0, sizeof *p);
  std::strcpy(p->name, "CPU simulation (test/cuda/sim)");
  p->major = 0;
  p->totalGlobalMem = size_t(1) << 30;
  return cudaSuccess;
}
