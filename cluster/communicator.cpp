// communicator.cpp: what every backend shares (see communicator.h): argument checks and the sticky
// "broken" state.
#include "communicator.h"

#include "../native/src/core/ops_cuda.h"

namespace nx {
namespace cluster {

std::shared_ptr<const Error> Communicator::broken() const {
  std::lock_guard<std::mutex> lk(mu_);
  return broken_;
}

const Error& Communicator::fail(const Error& e) {
  std::lock_guard<std::mutex> lk(mu_);
  if (!broken_) broken_ = std::make_shared<Error>(e);
  return *broken_;
}

void Communicator::throw_if_broken() const {
  auto b = broken();
  if (b) throw Error(b->code, "the communicator failed earlier and cannot be used: " + std::string(b->what()));
}

const char* collective_name(int kind) {
  switch (kind) {
    case kAllReduce: return "all_reduce";
    case kAllGather: return "all_gather";
    case kBroadcast: return "broadcast";
    case kBarrier: return "barrier";
  }
  return "?";
}

void check_collective_input(const Tensor& t, int device, const char* what, bool in_place) {
  NX_CHECK(t.storage != nullptr, "BAD_INPUT", what << ": no tensor");
  NX_CHECK(t.device() == device, "DEVICE",
           what << ": the tensor is on " << device_str(t.device()) << ", this communicator moves tensors on " << device_str(device)
                << (device < 0 ? " (use an NCCL communicator for CUDA tensors)" : ""));
  if (in_place) {
    NX_CHECK(t.is_contiguous(), "BAD_INPUT", what << " works in place on a contiguous tensor; call contiguous() first");
    NX_CHECK(!t.storage->mapped, "BAD_INPUT", what << ": cannot write into a read-only (memory-mapped) tensor; clone it first");
  }
}

Shape gathered_shape(const Tensor& t, int world, int* dim) {
  NX_CHECK(t.ndim() >= 1, "SHAPE", "all_gather needs a tensor with at least one dim");
  const int d = normalize_dim(*dim, t.ndim(), "all_gather");
  *dim = d;
  Shape s = t.shape;
  s[d] *= world;
  return s;
}

}  // namespace cluster
}  // namespace nx
