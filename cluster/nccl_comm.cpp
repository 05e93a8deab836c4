// nccl_comm.cpp: the NCCL communicator (see communicator.h) for CUDA tensors, one GPU per rank.
//
// NCCL is not linked: libnccl.so.2 (then libnccl.so; NX_NCCL_LIB names another path) is loaded with
// dlopen on first use, and only ncclGetUniqueId / ncclCommInitRank / ncclAllReduce / ncclAllGather /
// ncclBroadcast / ncclCommDestroy / ncclCommAbort / ncclGetErrorString are used, declared here, so the
// addon builds without NCCL headers and loads on machines without NCCL. Everything is real only in CUDA
// builds (NX_WITH_CUDA); elsewhere every entry point throws DEVICE saying why.
//
// Ordering: the executor thread enqueues each NCCL call on the device's one stream (cuda::stream_handle),
// the stream every CUDA kernel of that device runs on, so collectives are ordered with the compute ops
// exactly like the shm backend's, without a host synchronization. all_gather along a dim other than the
// first gathers into a [world, ...] scratch tensor and then permutes it with the ordinary copy op (queued
// after it). barrier() is an all_reduce of a 1-element tensor that it returns: reading it waits.
//
// Startup: rank 0 calls nccl_unique_id() (which also starts NCCL's bootstrap listener in rank 0's
// process) and the launcher hands the 256 hex characters to the other ranks; nccl_join blocks in
// ncclCommInitRank until every rank joined.
//
// Not done (needs hardware to test; written without a GPU, never run): no watchdog of our own, so a dead
// peer is only noticed by NCCL itself (its bootstrap/proxy socket errors) and a hung one hangs until
// abort() (ncclCommAbort) is called; opts.timeout_ms is not used yet.
#include "communicator.h"

#include "../native/src/core/executor.h"
#include "../native/src/core/ops.h"

#if defined(NX_WITH_CUDA)
#include <dlfcn.h>

#include "../kernels/cuda/dl.h"

#include <cstdlib>

#include "../kernels/cuda/cuda.h"
#endif

namespace nx {
namespace cluster {

#if defined(NX_WITH_CUDA)
namespace {

// ---- the NCCL ABI used (from nccl.h, stable since NCCL 2.0; bfloat16 since 2.10) ----
using nccl_result = int;  // ncclResult_t
using nccl_comm = void*;  // ncclComm_t
struct NcclUniqueId {
  char internal[128];
};
constexpr nccl_result kNcclSuccess = 0;
enum : int { kNcclInt32 = 2, kNcclInt64 = 4, kNcclFloat16 = 6, kNcclFloat32 = 7, kNcclBfloat16 = 9 };  // ncclDataType_t
constexpr int kNcclSum = 0;                                                                             // ncclRedOp_t

struct NcclLib {
  bool ok = false;
  std::string why, name;
  nccl_result (*get_unique_id)(NcclUniqueId*) = nullptr;
  nccl_result (*comm_init_rank)(nccl_comm*, int, NcclUniqueId, int) = nullptr;
  nccl_result (*comm_destroy)(nccl_comm) = nullptr;
  nccl_result (*comm_abort)(nccl_comm) = nullptr;
  nccl_result (*all_reduce)(const void*, void*, size_t, int, int, nccl_comm, void*) = nullptr;
  nccl_result (*all_gather)(const void*, void*, size_t, int, nccl_comm, void*) = nullptr;
  nccl_result (*broadcast)(const void*, void*, size_t, int, int, nccl_comm, void*) = nullptr;
  const char* (*error_string)(nccl_result) = nullptr;
};

const NcclLib& lib() {
  static const NcclLib l = [] {
    NcclLib r;
    std::string errors;
    const char* env = std::getenv("NX_NCCL_LIB");
    const char* names[] = {env && *env ? env : "libnccl.so.2", "libnccl.so"};
    const char* lib = dl::open_first(
        {names[0], names[1]},
        [&](void* h) {
          r.get_unique_id = reinterpret_cast<decltype(r.get_unique_id)>(dlsym(h, "ncclGetUniqueId"));
          r.comm_init_rank = reinterpret_cast<decltype(r.comm_init_rank)>(dlsym(h, "ncclCommInitRank"));
          r.comm_destroy = reinterpret_cast<decltype(r.comm_destroy)>(dlsym(h, "ncclCommDestroy"));
          r.comm_abort = reinterpret_cast<decltype(r.comm_abort)>(dlsym(h, "ncclCommAbort"));
          r.all_reduce = reinterpret_cast<decltype(r.all_reduce)>(dlsym(h, "ncclAllReduce"));
          r.all_gather = reinterpret_cast<decltype(r.all_gather)>(dlsym(h, "ncclAllGather"));
          r.broadcast = reinterpret_cast<decltype(r.broadcast)>(dlsym(h, "ncclBroadcast"));
          r.error_string = reinterpret_cast<decltype(r.error_string)>(dlsym(h, "ncclGetErrorString"));
          return r.get_unique_id && r.comm_init_rank && r.comm_destroy && r.comm_abort && r.all_reduce && r.all_gather &&
                 r.broadcast && r.error_string;
        },
        "some of the NCCL functions used", errors);
    if (lib != nullptr) {
      r.ok = true;
      r.name = lib;
      return r;
    }
    r.why = "NCCL could not be loaded (" + errors + ")";
    return r;
  }();
  return l;
}

void check_nccl(nccl_result r, const char* what) {
  if (r == kNcclSuccess) return;
  const char* msg = lib().error_string ? lib().error_string(r) : "unknown error";
  throw Error("DEVICE", std::string(what) + " failed: NCCL error " + std::to_string(r) + ": " + (msg ? msg : ""));
}

const NcclLib& require_nccl() {
  std::string why;
  NX_CHECK(cuda::available(&why), "DEVICE", "NCCL needs a CUDA device: " << why);
  const NcclLib& l = lib();
  NX_CHECK(l.ok, "DEVICE", l.why);
  return l;
}

int nccl_dtype(DType t, const char* what) {
  switch (t) {
    case DType::F32: return kNcclFloat32;
    case DType::F16: return kNcclFloat16;
    case DType::BF16: return kNcclBfloat16;
    case DType::I32: return kNcclInt32;
    case DType::I64: return kNcclInt64;
    default: break;
  }
  NX_FAIL("DTYPE", what << ": NCCL moves float32, float16, bfloat16, int32 or int64 tensors, not " << dtype_name(t));
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(const NcclUniqueId& id, int rank, int world, int device, const CommOptions& opts)
      : Communicator(rank, world), device_(device), opts_(opts) {
    const NcclLib& l = require_nccl();
    cuda::set_device(device);
    check_nccl(l.comm_init_rank(&comm_, world, id, rank), "ncclCommInitRank");
  }
  ~NcclCommunicator() override {
    if (comm_ != nullptr) lib().comm_destroy(comm_);
  }

  const char* backend() const override { return "nccl"; }
  int device() const override { return device_; }

  void all_reduce_sum_(const Tensor& t) override {
    check_collective_input(t, device_, "all_reduce", true);
    const int dt = nccl_dtype(t.dtype, "all_reduce");
    throw_if_broken();
    ++seq_;
    Tensor x = t;
    enqueue([this, x, dt](void* stream) {
      check_nccl(lib().all_reduce(x.data(), x.data(), static_cast<size_t>(x.numel()), dt, kNcclSum, comm_, stream), "ncclAllReduce");
    }, x.storage);
  }

  Tensor all_gather(const Tensor& t, int dim) override {
    check_collective_input(t, device_, "all_gather", false);
    const int dt = nccl_dtype(t.dtype, "all_gather");
    throw_if_broken();
    Shape out_shape = gathered_shape(t, world_, &dim);
    ++seq_;
    Tensor x = t.is_contiguous() ? t : run_op(Op::CAST, {&t}, {static_cast<double>(static_cast<int>(t.dtype))})[0];
    int64_t outer = 1;
    for (int i = 0; i < dim; i++) outer *= x.shape[i];
    Tensor out = Tensor::empty_on(out_shape, x.dtype, device_);
    if (outer == 1) {  // the ranks' blocks are already in place, one after the other
      enqueue([this, x, out, dt](void* stream) {
        check_nccl(lib().all_gather(x.data(), out.data(), static_cast<size_t>(x.numel()), dt, comm_, stream), "ncclAllGather");
      }, out.storage, x.storage);
      return out;
    }
    Shape scratch_shape{world_};
    scratch_shape.insert(scratch_shape.end(), x.shape.begin(), x.shape.end());
    Tensor scratch = Tensor::empty_on(scratch_shape, x.dtype, device_);
    enqueue([this, x, scratch, dt](void* stream) {
      check_nccl(lib().all_gather(x.data(), scratch.data(), static_cast<size_t>(x.numel()), dt, comm_, stream), "ncclAllGather");
    }, scratch.storage, x.storage);
    // out viewed as [..., world, n_dim, ...] <- scratch [world, ..., n_dim, ...] with world moved to `dim`
    Shape split = x.shape;
    split.insert(split.begin() + dim, world_);
    Tensor out_view = out.view(split, Tensor::contiguous_strides(split), 0);
    Shape sstr = Tensor::contiguous_strides(scratch_shape), pshape, pstr;
    for (int i = 0; i < dim; i++) pshape.push_back(scratch_shape[i + 1]), pstr.push_back(sstr[i + 1]);
    pshape.push_back(world_), pstr.push_back(sstr[0]);
    for (int i = dim; i < x.ndim(); i++) pshape.push_back(scratch_shape[i + 1]), pstr.push_back(sstr[i + 1]);
    Tensor src_view = scratch.view(pshape, pstr, 0);
    run_op(Op::COPY_, {&out_view, &src_view}, {});
    return out;
  }

  void broadcast_(const Tensor& t, int root) override {
    check_collective_input(t, device_, "broadcast", true);
    NX_CHECK(root >= 0 && root < world_, "BAD_INPUT", "broadcast: root " << root << " is not a rank of this group of " << world_);
    const int dt = nccl_dtype(t.dtype, "broadcast");
    throw_if_broken();
    ++seq_;
    Tensor x = t;
    enqueue([this, x, dt, root](void* stream) {
      check_nccl(lib().broadcast(x.data(), x.data(), static_cast<size_t>(x.numel()), dt, root, comm_, stream), "ncclBroadcast");
    }, x.storage);
  }

  Tensor barrier() override {
    throw_if_broken();
    Tensor token = Tensor::empty_on({1}, DType::F32, device_);
    run_op(Op::FILL_, {&token}, {1.0});
    ++seq_;
    enqueue([this, token](void* stream) {
      check_nccl(lib().all_reduce(token.data(), token.data(), 1, kNcclFloat32, kNcclSum, comm_, stream), "ncclAllReduce (barrier)");
    }, token.storage);
    return token;
  }

  void abort(const std::string& why) override {
    fail(Error("COMM", "rank " + std::to_string(rank_) + " aborted the group: " + why));
    std::lock_guard<std::mutex> lk(comm_mu_);
    if (comm_ != nullptr) {
      lib().comm_abort(comm_);  // unblocks NCCL calls of every rank
      comm_ = nullptr;
    }
  }

  void close() override {
    auto self = std::static_pointer_cast<NcclCommunicator>(shared_from_this());
    executor().after([self] {
      std::lock_guard<std::mutex> lk(self->comm_mu_);
      if (self->comm_ == nullptr) return;
      try {
        cuda::synchronize(self->device_);
      } catch (const Error&) {
      }
      lib().comm_destroy(self->comm_);
      self->comm_ = nullptr;
    });
  }

 private:
  // Queue fn(stream) on the executor. Like the shm backend, it runs even when its input failed earlier
  // (after aborting the group, so the peers do not wait for a call that never comes).
  void enqueue(std::function<void(void*)> fn, std::shared_ptr<Storage> out, std::shared_ptr<Storage> in = nullptr) {
    auto self = std::static_pointer_cast<NcclCommunicator>(shared_from_this());
    std::shared_ptr<Storage> probe = in ? in : out;
    executor().submit(
        [self, fn = std::move(fn), probe] {
          if (auto e = probe->get_error()) {
            self->abort("the input of its collective failed earlier: " + std::string(e->what()));
            throw Error(e->code, e->what());
          }
          self->throw_if_broken();
          {
            std::lock_guard<std::mutex> lk(self->comm_mu_);
            NX_CHECK(self->comm_ != nullptr, "COMM", "the NCCL communicator was closed or aborted");
          }
          // not under comm_mu_: an NCCL call may block (connection setup), and abort() must still get in
          try {
            cuda::set_device(self->device_);
            fn(cuda::stream_handle(self->device_));
          } catch (const Error& e) {
            self->fail(e);
            throw;
          }
        },
        {}, {out});
  }

  int device_;
  CommOptions opts_;
  std::mutex comm_mu_;  // abort() may come from the JS thread while the executor uses comm_
  nccl_comm comm_ = nullptr;
};

}  // namespace

bool nccl_available(std::string* why) {
  std::string w;
  if (!cuda::available(&w)) {
    if (why) *why = "NCCL needs a CUDA device: " + w;
    return false;
  }
  const NcclLib& l = lib();
  if (!l.ok) {
    if (why) *why = l.why;
    return false;
  }
  return true;
}

std::string nccl_unique_id() {
  const NcclLib& l = require_nccl();
  NcclUniqueId id{};
  check_nccl(l.get_unique_id(&id), "ncclGetUniqueId");
  static const char* hex = "0123456789abcdef";
  std::string s;
  s.reserve(2 * sizeof id.internal);
  for (unsigned char c : id.internal) {
    s.push_back(hex[c >> 4]);
    s.push_back(hex[c & 15]);
  }
  return s;
}

std::shared_ptr<Communicator> nccl_join(const std::string& unique_id_hex, int rank, int world, int device, const CommOptions& opts) {
  NX_CHECK(world >= 1, "BAD_INPUT", "world size must be at least 1, got " << world);
  NX_CHECK(rank >= 0 && rank < world, "BAD_INPUT", "rank " << rank << " is not in [0, " << world << ")");
  NcclUniqueId id{};
  NX_CHECK(unique_id_hex.size() == 2 * sizeof id.internal, "BAD_INPUT",
           "an NCCL unique id is " << 2 * sizeof id.internal << " hex characters, got " << unique_id_hex.size());
  auto nib = [&](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    NX_FAIL("BAD_INPUT", "an NCCL unique id is hex, found '" << c << "'");
  };
  for (size_t i = 0; i < sizeof id.internal; i++) id.internal[i] = static_cast<char>(nib(unique_id_hex[2 * i]) << 4 | nib(unique_id_hex[2 * i + 1]));
  return std::make_shared<NcclCommunicator>(id, rank, world, device, opts);
}

#else  // no CUDA in this build

namespace {
const char* kNoCuda = "NCCL needs a CUDA build: this addon was built without a CUDA toolkit";
}

bool nccl_available(std::string* why) {
  if (why) *why = kNoCuda;
  return false;
}
std::string nccl_unique_id() { throw Error("DEVICE", kNoCuda); }
std::shared_ptr<Communicator> nccl_join(const std::string&, int, int, int, const CommOptions&) { throw Error("DEVICE", kNoCuda); }

#endif

}  // namespace cluster
}  // namespace nx
