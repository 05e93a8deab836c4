// kernels/cuda/cuda.h: the CUDA backend's C++ interface. A plain C++ header: it includes no CUDA header,
// so core code can include it in every build; the definitions exist only where CMake compiled
// kernels/cuda/*.cu (it then defines NX_WITH_CUDA=1 for everything that links nx_core).
//
// Devices, memory and copies:
//   available(&why)        whether a CUDA device can be used (cudaGetDeviceCount on first use, then cached;
//                          NX_CUDA_DISABLE=1 forces "no"); `why` gets the reason when not.
//   set_device(d)          makes ordinal d current on the calling thread (checked against the count).
//   device_alloc / device_free
//                          a caching allocator over cudaMalloc: freed blocks are kept by (device, rounded
//                          size) and reused; a failed cudaMalloc drops the device's cache and tries once
//                          more before throwing OOM. Reuse is safe because every kernel and copy of a
//                          device runs on that device's one stream, in order.
//   copy_h2d / copy_d2h / copy_d2d
//                          byte copies on the current device's stream. copy_h2d and copy_d2h wait for the
//                          stream (so the host buffer may be reused or read at once); copy_d2d is queued.
//   synchronize(d)         waits for device d's stream; a kernel that failed asynchronously surfaces here.
//
// Kernels: the same contracts as the CPU families (kernels/cpu/*.h), each tested against its nx::ref
// kernel by test/cuda (build/nx_cuda_tests). They run on the CURRENT device's stream (set_device first)
// and take KViews whose data pointers are device pointers of that device. Launches are asynchronous;
// launch failures throw Error{"DEVICE"}. Data-dependent errors (an index out of range, integer division
// by zero) are found on the device and reported by a synchronous check right after the kernel (one
// stream sync per index op), with the same code and message shape as the CPU kernels.
//
// Every failing CUDA call becomes nx::Error with code "DEVICE" naming the call and CUDA's message
// (allocation failures: "OOM").
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "../common.h"
#include "../cpu/elementwise.h"  // BinaryOp, UnaryOp
#include "../cpu/reduce.h"       // ReduceOp

namespace nx {
namespace cuda {

// ---- devices ----
bool available(std::string* why);
int device_count();             // 0 when unavailable
std::string device_name(int device);
std::string runtime_version();  // "13.0" (the CUDA runtime linked in), driver: "12.8" or "none"
std::string driver_version();
void set_device(int device);
void synchronize(int device);
// The cudaStream_t of device `device`'s stream (created on first use), as void*, for libraries that
// enqueue work in order with our kernels (NCCL: cluster/nccl_comm.cpp).
void* stream_handle(int device);
// Whether any stream was ever created (no CUDA work happened otherwise: synchronizing is a no-op).
bool used();
// Synchronize every device that was used.
void synchronize_all();

// ---- memory ----
void* device_alloc(int device, size_t nbytes);
void device_free(int device, void* p, size_t nbytes) noexcept;
size_t device_bytes_in_use();
size_t device_bytes_cached();
void release_cached_device_memory();

// ---- copies on the current device's stream ----
// A contiguous (row-major) KView over memory p, host or device.
KView dense_view(void* p, DType t, int ndim, const int64_t* shape);
void copy_h2d(void* dst, const void* src, size_t nbytes);
void copy_d2h(void* dst, const void* src, size_t nbytes);
void copy_d2d(void* dst, const void* src, size_t nbytes);

// ---- kernels (current device) ----
void binary(BinaryOp op, const KView& a, const KView& b, const KView& out);
void unary(UnaryOp op, const KView& x, const KView& out);
void cast(const KView& x, const KView& out);  // also the strided copy (x and out of any layouts)
void fill(const KView& out, double value);
void where(const KView& cond, const KView& a, const KView& b, const KView& out);

void reduce(ReduceOp op, const KView& x, int dim, const KView& out);
void cumsum(const KView& x, int dim, const KView& out);
void softmax(const KView& x, int dim, bool log, const KView& out);

void rmsnorm(const KView& x, const KView* weight, float eps, const KView& out);
void layernorm(const KView& x, const KView* weight, const KView* bias, float eps, const KView& out);

void rope(const KView& x, const KView& pos, const KView& inv_freq, bool interleaved, const KView& out);
// head_dim (q.shape[3]) up to kAttentionMaxHeadDim.
constexpr int64_t kAttentionMaxHeadDim = 1024;
void attention(const KView& q, const KView& k, const KView& v, const KView* mask, float scale, const KView& out);

void embedding(const KView& weight, const KView& ids, const KView& out);
void gather(const KView& x, int dim, const KView& index, const KView& out);
void scatter(const KView& dst, int dim, const KView& index, const KView& src);
void index_select(const KView& x, int dim, const KView& index, const KView& out);
void topk(const KView& x, int64_t k, const KView& values, const KView& indices);

// out[M,N] = a[M,K] @ b[K,N] (+ bias[N]); a, b, bias any float dtype and strides, out f32 (any strides).
// cuBLAS (dlopen'd: libcublas.so.13, .12, libcublas.so) sgemm where it loads; operands that are not f32
// with a unit stride are first converted into dense f32 scratch (bf16/f16 weights: on every call).
// Without cuBLAS (or NX_CUBLAS=0, or set_gemm_path(KERNEL)) a tiled kernel of our own.
enum class GemmPath { AUTO, CUBLAS, KERNEL };
void set_gemm_path(GemmPath p);  // AUTO: cuBLAS when loaded; CUBLAS: throw DEVICE when it is not
bool cublas_available(std::string* why);
void gemm(const KView& a, const KView& b, const KView* bias, const KView& out);

}  // namespace cuda
}  // namespace nx
