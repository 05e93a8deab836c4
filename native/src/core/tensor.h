// tensor.h: the one tensor type. A Tensor is a view (dtype, shape, strides, offset) over a refcounted
// Storage; views share the storage and never copy.
//
// Strides and offset are counted in ELEMENTS of the tensor's dtype (PyTorch/candle convention), so a
// transposed view of a [4, 3] tensor has shape [3, 4] and strides [1, 3]. Storage is plain host memory
// (malloc'd and 64-byte aligned, or a read-only memory-mapped safetensors file kept alive by refcount),
// or CUDA device memory (Storage::device >= 0, from the caching allocator in kernels/cuda; only in
// builds with NX_WITH_CUDA). A tensor's device is its storage's; ops dispatch on it (ops_cuda.h).
//
// Results are computed asynchronously by the Executor (executor.h): a Tensor may exist before its values
// do. Storage::error records a failure of the kernel that was to fill it; readers see it after sync.
//
//   auto t = nx::Tensor::empty({2, 3}, nx::DType::F32);
//   nx::KView v = t.kview();   // what kernels see
#pragma once
#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "check.h"

namespace nx {

// Process-wide counters, reported to JS (`memory()`) and to V8 (AdjustExternalMemory).
struct MemoryStats {
  std::atomic<int64_t> storages{0};
  std::atomic<int64_t> host_bytes{0};   // bytes we allocated (mmaps not counted)
  std::atomic<int64_t> mapped_bytes{0}; // bytes mapped from files
  std::atomic<int64_t> device_bytes{0}; // CUDA bytes held by storages (all devices)
};
MemoryStats& memory_stats();
// Bytes of freed large blocks kept for reuse (not counted in host_bytes), and a way to drop them.
size_t cached_host_bytes();
// End of an epoch of work (Executor::sync after some ops ran): frees cached blocks of sizes idle for a while.
void host_cache_epoch();
// Largest single allocation allowed (0 = no limit); servers set it so no graph can exhaust memory.
void set_max_allocation(size_t bytes);
void release_cached_host_memory();

struct Storage {
  void* data = nullptr;
  size_t nbytes = 0;
  bool mapped = false;        // read-only file mapping: writes are refused
  bool meta = false;          // shape-only (scan): no memory, kernels never run
  int device = -1;            // -1: host memory; >= 0: memory of CUDA device `device`
  std::function<void()> release;
  // Set by the executor thread when the kernel that fills this storage failed; read after a sync.
  std::shared_ptr<const Error> error;
  std::mutex error_mu;

  Storage() = default;
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  ~Storage();

  static std::shared_ptr<Storage> allocate(size_t nbytes);
  // nbytes of CUDA memory on `device` (>= 0); throws DEVICE where this build or machine has no CUDA.
  static std::shared_ptr<Storage> allocate_device(size_t nbytes, int device);
  void set_error(const std::shared_ptr<const Error>& e) {
    std::lock_guard<std::mutex> lk(error_mu);
    if (!error) error = e;
  }
  std::shared_ptr<const Error> get_error() {
    std::lock_guard<std::mutex> lk(error_mu);
    return error;
  }
};

using Shape = std::vector<int64_t>;

struct Tensor {
  std::shared_ptr<Storage> storage;
  DType dtype = DType::F32;
  Shape shape;
  Shape strides;
  int64_t offset = 0;

  int ndim() const { return static_cast<int>(shape.size()); }
  int device() const { return storage ? storage->device : -1; }
  int64_t numel() const;
  bool is_contiguous() const;
  void* data() const { return static_cast<char*>(storage->data) + offset * static_cast<int64_t>(dtype_size(dtype)); }
  KView kview() const;

  static Shape contiguous_strides(const Shape& shape);
  // In meta mode (see set_meta_mode) the storage is shape-only unless `real` is set.
  static Tensor empty(const Shape& shape, DType dtype, bool real = false);
  // empty() on a device: -1 is the host (the same as empty()), >= 0 a CUDA device. Meta mode applies.
  static Tensor empty_on(const Shape& shape, DType dtype, int device);
  // A view over the same storage; checks that every reachable element lies inside the storage.
  Tensor view(const Shape& shape, const Shape& strides, int64_t offset) const;
};

std::string shape_str(const Shape& s);

// Meta mode: tensors allocated while it is on carry shapes and dtypes only (model.scan()).
void set_meta_mode(bool on);
bool meta_mode();
// While alive, Tensor::empty on THIS thread makes shape-only storages (as meta mode does process-wide).
// The CUDA dispatcher runs the CPU dispatcher's checks under it to learn output shapes without memory.
struct ShapeOnlyScope {
  ShapeOnlyScope();
  ~ShapeOnlyScope();
  ShapeOnlyScope(const ShapeOnlyScope&) = delete;
  ShapeOnlyScope& operator=(const ShapeOnlyScope&) = delete;

 private:
  bool prev_;
};
int normalize_dim(int64_t dim, int ndim, const char* what);

}  // namespace nx
