// tensor.cpp: Storage allocation and Tensor views (see tensor.h).
#include "tensor.h"

#include "executor.h"

#include <cstdlib>
#include <sys/mman.h>
#include <iterator>
#include <mutex>
#include <unordered_map>
#include <vector>
#include <sstream>

#include "../../../kernels/cuda/cuda.h"

namespace nx {

MemoryStats& memory_stats() {
  static MemoryStats s;
  return s;
}

Storage::~Storage() {
  if (release) release();
  memory_stats().storages--;
}

namespace {

// Large blocks come straight from mmap and go back with munmap: through malloc, glibc's adaptive mmap
// threshold would move freed blocks of a few MiB onto its heap, where freeing them rarely lowers RSS.
void* big_alloc(size_t n) {
  void* p = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}
void big_free(void* p, size_t n) { munmap(p, n); }

// A cache of large host blocks. A forward pass allocates the same sizes every step; returning them to
// the OS (glibc unmaps big blocks on free) would make every step fault fresh pages in again, which
// costs more than the kernels that fill them. Freed blocks of 256 KiB and more are kept by exact
// (page-rounded) size up to a byte budget (NX_ALLOC_CACHE_MB, default 256) and reused first.
//
// Sizes that stop coming back are returned to the system: time is counted in epochs, one per
// synchronization with JS that followed some work (a generation step, a trace, a read of results;
// Executor::sync calls epoch()), and blocks of a size that was neither allocated nor freed for
// kGraceEpochs whole epochs are freed. So a prefill's large temporaries do not stay resident through the
// decode steps that follow (which use other sizes), and a server's memory follows its current jobs,
// while a loop of same-shaped steps keeps every block it reuses.
class BlockCache {
 public:
  static constexpr size_t kMin = 256 * 1024;
  static constexpr uint64_t kGraceEpochs = 2;
  BlockCache() {
    const char* e = std::getenv("NX_ALLOC_CACHE_MB");
    budget_ = static_cast<size_t>(e ? std::atoll(e) : 256) << 20;
  }
  void* take(size_t n) {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = free_.find(n);
    if (it == free_.end()) return nullptr;
    it->second.last_used = epoch_;
    if (it->second.blocks.empty()) return nullptr;
    void* p = it->second.blocks.back();
    it->second.blocks.pop_back();
    cached_ -= n;
    return p;
  }
  // true when kept (the caller must not free it). The newest block wins: older blocks of other sizes
  // are returned to the system to make room (a benchmark or a phase change leaves sizes that will not
  // come back; the block just freed is the one most likely to be asked for next).
  bool give(void* p, size_t n) {
    std::lock_guard<std::mutex> lk(mu_);
    if (n > budget_) return false;
    for (auto it = free_.begin(); cached_ + n > budget_ && it != free_.end(); ++it) {
      auto& b = it->second.blocks;
      while (!b.empty() && cached_ + n > budget_) {
        big_free(b.back(), it->first);
        b.pop_back();
        cached_ -= it->first;
      }
    }
    Entry& e = free_[n];
    e.blocks.push_back(p);
    e.last_used = epoch_;
    cached_ += n;
    return true;
  }
  // One epoch ended: free the blocks of sizes idle for kGraceEpochs epochs (and forget those sizes).
  void epoch() {
    std::lock_guard<std::mutex> lk(mu_);
    epoch_++;
    for (auto it = free_.begin(); it != free_.end();) {
      if (epoch_ - it->second.last_used > kGraceEpochs) {
        for (void* p : it->second.blocks) big_free(p, it->first);
        cached_ -= it->first * it->second.blocks.size();
        it = free_.erase(it);
      } else {
        ++it;
      }
    }
  }
  size_t cached() {
    std::lock_guard<std::mutex> lk(mu_);
    return cached_;
  }
  void clear() {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& kv : free_)
      for (void* p : kv.second.blocks) big_free(p, kv.first);
    free_.clear();
    cached_ = 0;
  }

 private:
  struct Entry {
    std::vector<void*> blocks;
    uint64_t last_used = 0;  // the epoch of the last allocation or free of this size
  };
  std::mutex mu_;
  std::unordered_map<size_t, Entry> free_;
  size_t cached_ = 0;
  size_t budget_;
  uint64_t epoch_ = 0;
};

BlockCache& block_cache() {
  static BlockCache* c = new BlockCache();  // leaked: storages may be freed during static destruction
  return *c;
}

}  // namespace

size_t cached_host_bytes() { return block_cache().cached(); }
void host_cache_epoch() { block_cache().epoch(); }
void release_cached_host_memory() { block_cache().clear(); }

namespace {
std::atomic<size_t> g_max_alloc{0};  // 0 = no limit
}
void set_max_allocation(size_t bytes) { g_max_alloc = bytes; }

std::shared_ptr<Storage> Storage::allocate(size_t nbytes) {
  size_t cap = g_max_alloc.load();
  NX_CHECK(cap == 0 || nbytes <= cap, "TOO_LARGE",
           "a tensor of " << nbytes << " bytes exceeds this process's limit of " << cap << " bytes per tensor");
  auto s = std::make_shared<Storage>();
  size_t n = (nbytes + 63) & ~static_cast<size_t>(63);
  if (n == 0) n = 64;
  const bool big = n >= BlockCache::kMin;
  if (big) n = (n + 4095) & ~static_cast<size_t>(4095);
  void* p = big ? block_cache().take(n) : nullptr;
  if (p == nullptr) {
    p = big ? big_alloc(n) : std::aligned_alloc(64, n);
    if (p == nullptr && big) {  // give the cache back to the system and try once more
      block_cache().clear();
      p = big_alloc(n);
    }
  }
  NX_CHECK(p != nullptr, "OOM", "could not allocate " << nbytes << " bytes");
  s->data = p;
  s->nbytes = nbytes;
  memory_stats().storages++;
  memory_stats().host_bytes += static_cast<int64_t>(n);
  note_host_allocation(n);  // the executor bounds what queued tasks hold (executor.h)
  s->release = [p, n, big] {
    memory_stats().host_bytes -= static_cast<int64_t>(n);
    if (!big) std::free(p);
    else if (!block_cache().give(p, n)) big_free(p, n);
  };
  return s;
}

std::shared_ptr<Storage> Storage::allocate_device(size_t nbytes, int device) {
#if NX_WITH_CUDA
  NX_CHECK(device >= 0, "DEVICE", "allocate_device: bad device " << device);
  size_t cap = g_max_alloc.load();
  NX_CHECK(cap == 0 || nbytes <= cap, "TOO_LARGE",
           "a tensor of " << nbytes << " bytes exceeds this process's limit of " << cap << " bytes per tensor");
  void* p = cuda::device_alloc(device, nbytes);  // throws DEVICE / OOM
  auto s = std::make_shared<Storage>();
  s->data = p;
  s->nbytes = nbytes;
  s->device = device;
  memory_stats().storages++;
  memory_stats().device_bytes += static_cast<int64_t>(nbytes);
  s->release = [p, nbytes, device] {
    memory_stats().device_bytes -= static_cast<int64_t>(nbytes);
    cuda::device_free(device, p, nbytes);
  };
  return s;
#else
  (void)nbytes;
  NX_FAIL("DEVICE", "cuda:" << device << " requested, but this build has no CUDA (built without a CUDA toolkit)");
#endif
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

bool Tensor::is_contiguous() const {
  int64_t expect = 1;
  for (int i = ndim() - 1; i >= 0; i--) {
    if (shape[i] != 1 && strides[i] != expect) return false;
    expect *= shape[i];
  }
  return true;
}

KView Tensor::kview() const {
  KView v;
  NX_CHECK(ndim() <= kMaxDims, "SHAPE", "tensors have at most " << kMaxDims << " dims, got " << ndim());
  v.data = data();
  v.dtype = dtype;
  v.ndim = ndim();
  for (int i = 0; i < v.ndim; i++) {
    v.shape[i] = shape[i];
    v.strides[i] = strides[i];
  }
  return v;
}

Shape Tensor::contiguous_strides(const Shape& shape) {
  Shape st(shape.size());
  int64_t s = 1;
  for (int i = static_cast<int>(shape.size()) - 1; i >= 0; i--) {
    st[i] = s;
    s *= shape[i];
  }
  return st;
}

namespace {
std::atomic<bool> g_meta{false};
thread_local bool t_shape_only = false;
}
void set_meta_mode(bool on) { g_meta = on; }
bool meta_mode() { return g_meta; }
ShapeOnlyScope::ShapeOnlyScope() : prev_(t_shape_only) { t_shape_only = true; }
ShapeOnlyScope::~ShapeOnlyScope() { t_shape_only = prev_; }

namespace {
int64_t checked_numel(const Shape& shape) {
  NX_CHECK(static_cast<int>(shape.size()) <= kMaxDims, "SHAPE", "tensors have at most " << kMaxDims << " dims");
  int64_t n = 1;
  for (auto d : shape) {
    NX_CHECK(d >= 0, "SHAPE", "negative dimension in shape " << shape_str(shape));
    n *= d;
  }
  NX_CHECK(n < (int64_t(1) << 40), "OOM", "tensor of shape " << shape_str(shape) << " is too large");
  return n;
}
std::shared_ptr<Storage> shape_only_storage(size_t nbytes, int device) {
  auto st = std::make_shared<Storage>();
  st->nbytes = nbytes;
  st->meta = true;
  st->device = device;
  memory_stats().storages++;
  return st;
}
}  // namespace

Tensor Tensor::empty(const Shape& shape, DType dtype, bool real) {
  const int64_t n = checked_numel(shape);
  Tensor t;
  if ((g_meta || t_shape_only) && !real) {
    t.storage = shape_only_storage(static_cast<size_t>(n) * dtype_size(dtype), -1);
  } else {
    t.storage = Storage::allocate(static_cast<size_t>(n) * dtype_size(dtype));
  }
  t.dtype = dtype;
  t.shape = shape;
  t.strides = contiguous_strides(shape);
  return t;
}

Tensor Tensor::empty_on(const Shape& shape, DType dtype, int device) {
  if (device < 0) return empty(shape, dtype);
  const int64_t n = checked_numel(shape);
  const size_t nbytes = static_cast<size_t>(n) * dtype_size(dtype);
  Tensor t;
  t.storage = (g_meta || t_shape_only) ? shape_only_storage(nbytes, device) : Storage::allocate_device(nbytes, device);
  t.dtype = dtype;
  t.shape = shape;
  t.strides = contiguous_strides(shape);
  return t;
}

Tensor Tensor::view(const Shape& nshape, const Shape& nstrides, int64_t noffset) const {
  NX_CHECK(nshape.size() == nstrides.size(), "SHAPE", "view: shape and strides differ in length");
  NX_CHECK(static_cast<int>(nshape.size()) <= kMaxDims, "SHAPE", "tensors have at most " << kMaxDims << " dims");
  int64_t lo = noffset, hi = noffset;
  bool empty = false;
  for (size_t i = 0; i < nshape.size(); i++) {
    NX_CHECK(nshape[i] >= 0, "SHAPE", "view: negative size in " << shape_str(nshape));
    if (nshape[i] == 0) empty = true;
    int64_t span = (nshape[i] - 1) * nstrides[i];
    if (span < 0) lo += span; else hi += span;
  }
  int64_t cap = static_cast<int64_t>(storage->nbytes / dtype_size(dtype));
  NX_CHECK(empty || (lo >= 0 && hi < cap), "INDEX",
           "view " << shape_str(nshape) << " at offset " << noffset << " reaches outside its storage of " << cap << " elements");
  Tensor t;
  t.storage = storage;
  t.dtype = dtype;
  t.shape = nshape;
  t.strides = nstrides;
  t.offset = noffset;
  return t;
}

std::string shape_str(const Shape& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); i++) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

int normalize_dim(int64_t dim, int ndim, const char* what) {
  int64_t d = dim < 0 ? dim + ndim : dim;
  NX_CHECK(d >= 0 && d < (ndim == 0 ? 1 : ndim), "INDEX", what << ": dim " << dim << " out of range for " << ndim << " dims");
  return static_cast<int>(d);
}

}  // namespace nx
