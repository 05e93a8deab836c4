// runtime.cu: devices, streams, the caching device allocator, copies, and the shared host helpers of
// common.cuh (contract in cuda.h).
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "common.cuh"

namespace nx {
namespace cuda {

namespace {

constexpr int kMaxDevices = 64;

struct DeviceState {
  cudaStream_t stream = nullptr;
  long long* bad = nullptr;  // the bad-element slot (device memory)
};
std::mutex g_state_mu;
DeviceState g_state[kMaxDevices];
std::atomic<bool> g_used{false};

struct Availability {
  bool ok = false;
  int count = 0;
  std::string why;
};

std::string version_str(int v) {  // 12080 -> "12.8"
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

const Availability& availability() {
  static const Availability a = [] {
    Availability r;
    const char* off = std::getenv("NX_CUDA_DISABLE");
    if (off != nullptr && off[0] != '\0' && off[0] != '0') {
      r.why = "CUDA is disabled by NX_CUDA_DISABLE";
      return r;
    }
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
      cudaGetLastError();  // clear
      int rt = 0;
      cudaRuntimeGetVersion(&rt);
      if (e == cudaErrorNoDevice) {
        r.why = "no CUDA device found (the NVIDIA driver is present but sees no GPU)";
      } else if (e == cudaErrorInsufficientDriver) {
        r.why = "no usable NVIDIA driver: none is installed, or it is older than CUDA " + version_str(rt) +
                " which this build needs";
      } else {
        r.why = std::string("CUDA is unavailable: ") + cudaGetErrorName(e) + ": " + cudaGetErrorString(e);
      }
      return r;
    }
    if (n <= 0) {
      r.why = "no CUDA device found";
      return r;
    }
    r.ok = true;
    r.count = n < kMaxDevices ? n : kMaxDevices;
    return r;
  }();
  return a;
}

void require(int device) {
  const Availability& a = availability();
  if (!a.ok) throw Error("DEVICE", "CUDA is not available: " + a.why);
  if (device < 0 || device >= a.count)
    throw Error("DEVICE", "cuda:" + std::to_string(device) + " does not exist (" + std::to_string(a.count) +
                              " CUDA device" + (a.count == 1 ? "" : "s") + ")");
}

DeviceState& state(int device) {
  std::lock_guard<std::mutex> lk(g_state_mu);
  DeviceState& s = g_state[device];
  if (s.stream == nullptr) {
    int prev = -1;
    cudaGetDevice(&prev);
    check(cudaSetDevice(device), "cudaSetDevice");
    cudaStream_t st = nullptr;
    check(cudaStreamCreate(&st), "cudaStreamCreate");
    void* bad = nullptr;
    cudaError_t e = cudaMalloc(&bad, 64);
    if (e != cudaSuccess) {
      cudaStreamDestroy(st);
      check(e, "cudaMalloc (error slot)");
    }
    s.bad = static_cast<long long*>(bad);
    s.stream = st;
    g_used = true;
    if (prev >= 0 && prev != device) cudaSetDevice(prev);
  }
  return s;
}

// ---- caching allocator ----
size_t rounded(size_t n) {
  if (n == 0) n = 1;
  const size_t small = 512, big = size_t(1) << 20;
  return n < big ? (n + small - 1) / small * small : (n + big - 1) / big * big;
}

class DeviceCache {
 public:
  void* take(int dev, size_t n) {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = free_.find(key(dev, n));
    if (it == free_.end() || it->second.empty()) return nullptr;
    void* p = it->second.back();
    it->second.pop_back();
    cached_ -= n;
    in_use_ += n;
    return p;
  }
  void note_alloc(size_t n) {
    std::lock_guard<std::mutex> lk(mu_);
    in_use_ += n;
  }
  void give(int dev, void* p, size_t n) {
    std::lock_guard<std::mutex> lk(mu_);
    free_[key(dev, n)].push_back(p);
    cached_ += n;
    in_use_ -= n;
  }
  // cudaFree every cached block of `dev` (-1: all devices). cudaFree waits for the device, so blocks
  // whose last kernels are still running are not released under them.
  void release(int dev) {
    std::lock_guard<std::mutex> lk(mu_);
    int prev = -1;
    cudaGetDevice(&prev);
    for (auto it = free_.begin(); it != free_.end();) {
      const int d = static_cast<int>(it->first >> 56);
      const size_t n = static_cast<size_t>(it->first & ((uint64_t(1) << 56) - 1));
      if (dev >= 0 && d != dev) {
        ++it;
        continue;
      }
      cudaSetDevice(d);
      for (void* p : it->second) {
        cudaFree(p);
        cached_ -= n;
      }
      it = free_.erase(it);
    }
    cudaGetLastError();
    if (prev >= 0) cudaSetDevice(prev);
  }
  size_t in_use() {
    std::lock_guard<std::mutex> lk(mu_);
    return in_use_;
  }
  size_t cached() {
    std::lock_guard<std::mutex> lk(mu_);
    return cached_;
  }

 private:
  static uint64_t key(int dev, size_t n) { return (static_cast<uint64_t>(dev) << 56) | static_cast<uint64_t>(n); }
  std::mutex mu_;
  std::unordered_map<uint64_t, std::vector<void*>> free_;
  size_t cached_ = 0, in_use_ = 0;
};

DeviceCache& cache() {
  static DeviceCache* c = new DeviceCache();  // leaked: storages may be freed during static destruction
  return *c;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// errors, streams, launch geometry
// ------------------------------------------------------------------------------------------------
void check(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return;
  cudaGetLastError();  // clear a non-sticky error so later calls are not blamed for it
  throw Error(e == cudaErrorMemoryAllocation ? "OOM" : "DEVICE",
              std::string(what) + ": " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}

void check_launch(const char* what) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw Error("DEVICE", std::string(what) + ": kernel launch failed: " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}

int current_device() {
  int d = 0;
  check(cudaGetDevice(&d), "cudaGetDevice");
  return d;
}

cudaStream_t stream() { return state(current_device()).stream; }

void* stream_handle(int device) {
  require(device);
  return static_cast<void*>(state(device).stream);
}

long long* bad_slot() { return state(current_device()).bad; }

void bad_reset() {
  // 0x7f in every byte is 0x7f7f7f7f7f7f7f7f: larger than any linear index, so "nothing flagged".
  check(cudaMemsetAsync(bad_slot(), 0x7f, sizeof(long long), stream()), "cudaMemsetAsync (error slot)");
}

long long bad_first() {
  long long v = 0;
  check(cudaMemcpyAsync(&v, bad_slot(), sizeof v, cudaMemcpyDeviceToHost, stream()), "cudaMemcpyAsync (error slot)");
  check(cudaStreamSynchronize(stream()), "cudaStreamSynchronize");
  return v == 0x7f7f7f7f7f7f7f7fLL ? kNoBad : v;
}

int64_t read_index_at(const KView& v, int64_t lin) {
  int64_t o = 0;
  for (int d = v.ndim - 1; d >= 0; d--) {
    const int64_t i = lin % v.shape[d];
    lin /= v.shape[d];
    o += i * v.strides[d];
  }
  const size_t es = dtype_size(v.dtype);
  unsigned char buf[8] = {0};
  copy_d2h(buf, static_cast<const char*>(v.data) + o * static_cast<int64_t>(es), es);
  return load_i64(buf, v.dtype, 0);
}

Scratch::Scratch(size_t bytes) : n(bytes), dev(current_device()) { p = device_alloc(dev, bytes); }
Scratch::~Scratch() { device_free(dev, p, n); }

KView dense_view(void* p, DType t, int ndim, const int64_t* shape) {
  KView v;
  v.data = p;
  v.dtype = t;
  v.ndim = ndim;
  int64_t s = 1;
  for (int i = ndim - 1; i >= 0; i--) {
    v.shape[i] = shape[i];
    v.strides[i] = s;
    s *= shape[i];
  }
  return v;
}

// ------------------------------------------------------------------------------------------------
// devices
// ------------------------------------------------------------------------------------------------
bool available(std::string* why) {
  const Availability& a = availability();
  if (!a.ok && why) *why = a.why;
  return a.ok;
}

int device_count() { return availability().count; }

std::string device_name(int device) {
  require(device);
  cudaDeviceProp p;
  check(cudaGetDeviceProperties(&p, device), "cudaGetDeviceProperties");
  return std::string(p.name) + " (sm_" + std::to_string(p.major) + std::to_string(p.minor) + ", " +
         std::to_string(p.totalGlobalMem >> 20) + " MiB)";
}

std::string runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return version_str(v);
}

std::string driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess || v == 0) {
    cudaGetLastError();
    return "none";
  }
  return version_str(v);
}

void set_device(int device) {
  require(device);
  check(cudaSetDevice(device), "cudaSetDevice");
}

void synchronize(int device) {
  require(device);
  DeviceState& s = state(device);
  check(cudaStreamSynchronize(s.stream), "cudaStreamSynchronize");
}

bool used() { return g_used.load(); }

void synchronize_all() {
  if (!g_used) return;
  for (int d = 0; d < device_count(); d++) {
    cudaStream_t st;
    {
      std::lock_guard<std::mutex> lk(g_state_mu);
      st = g_state[d].stream;
    }
    if (st) check(cudaStreamSynchronize(st), "cudaStreamSynchronize");
  }
}

// ------------------------------------------------------------------------------------------------
// memory
// ------------------------------------------------------------------------------------------------
void* device_alloc(int device, size_t nbytes) {
  require(device);
  const size_t n = rounded(nbytes);
  if (void* p = cache().take(device, n)) return p;
  int prev = -1;
  cudaGetDevice(&prev);
  check(cudaSetDevice(device), "cudaSetDevice");
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, n);
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    cache().release(device);
    cudaSetDevice(device);
    e = cudaMalloc(&p, n);
  }
  if (prev >= 0 && prev != device) cudaSetDevice(prev);
  if (e != cudaSuccess) {
    cudaGetLastError();
    if (e == cudaErrorMemoryAllocation)
      throw Error("OOM", "CUDA out of memory: could not allocate " + std::to_string(nbytes) + " bytes on cuda:" +
                             std::to_string(device) + " (" + std::to_string(cache().in_use() >> 20) + " MiB in use)");
    check(e, "cudaMalloc");
  }
  cache().note_alloc(n);
  return p;
}

void device_free(int device, void* p, size_t nbytes) noexcept {
  if (p == nullptr) return;
  try {
    cache().give(device, p, rounded(nbytes));
  } catch (...) {
    // out of memory growing the free list: leak the block rather than throw from a destructor
  }
}

size_t device_bytes_in_use() { return cache().in_use(); }
size_t device_bytes_cached() { return cache().cached(); }
void release_cached_device_memory() {
  if (g_used) synchronize_all();
  cache().release(-1);
}

// ------------------------------------------------------------------------------------------------
// copies
// ------------------------------------------------------------------------------------------------
void copy_h2d(void* dst, const void* src, size_t nbytes) {
  if (nbytes == 0) return;
  cudaStream_t s = stream();
  check(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyHostToDevice, s), "cudaMemcpyAsync (host to device)");
  // Conservative: wait, so the host buffer may be freed or rewritten as soon as this returns.
  check(cudaStreamSynchronize(s), "cudaStreamSynchronize (after a copy to the device)");
}

void copy_d2h(void* dst, const void* src, size_t nbytes) {
  if (nbytes == 0) return;
  cudaStream_t s = stream();
  check(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync (device to host)");
  check(cudaStreamSynchronize(s), "cudaStreamSynchronize (after a copy to the host)");
}

void copy_d2d(void* dst, const void* src, size_t nbytes) {
  if (nbytes == 0) return;
  check(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyDeviceToDevice, stream()), "cudaMemcpyAsync (device to device)");
}

}  // namespace cuda
}  // namespace nx
