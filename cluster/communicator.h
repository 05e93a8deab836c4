// communicator.h: collectives between the ranks of a tensor-parallel group (one process per rank).
//
//   // every rank, with the same name (made unique by the launcher) and world size:
//   auto comm = nx::cluster::shm_join("nnsight-tp-1234-ab12", rank, 2, {});
//   comm->all_reduce_sum_(partial);            // partial += the other ranks' partials, in place
//   nx::Tensor full = comm->all_gather(shard, -1);  // ranks' shards concatenated along the last dim
//   comm->broadcast_(ids, 0);                  // rank 0's values everywhere
//   nx::Tensor token = comm->barrier();        // a 1-element tensor, filled once every rank arrived
//
// Backends: `shm` (processes on one machine, host tensors, shared memory; shm_comm.cpp) and `nccl`
// (CUDA tensors, libnccl.so.2 loaded at run time; nccl_comm.cpp, real only in CUDA builds).
//
// Ordering: a collective is validated and its output allocated on the caller's thread (argument errors
// throw at once, like any op), then queued on the executor (core/executor.h) like a compute op, so on each
// rank it runs after the kernels that produce its input and before the ones that read its output. Every
// rank must issue the same collectives in the same order (as with NCCL); the shm backend checks this at
// run time (kind, dtype, shape and root/dim of each call) and fails every rank with the same error when
// they disagree.
//
// Failures never hang: a peer process that exits, disposes its communicator or aborts makes the others'
// pending and later collectives fail with code COMM (shm: found within ~20 ms; NCCL: see nccl_comm.cpp);
// a peer that is alive but does not arrive within the timeout gives TIMEOUT. A failed collective marks
// its output (the executor's per-storage error) and breaks the communicator: later calls fail with the
// first error. A collective whose input carries an error (an earlier kernel failed) aborts the group, so
// the peers do not wait for a rank that will never contribute.
//
// Errors use nx::Error codes: BAD_INPUT (bad rank/world, a name in use, a rank joined twice, collectives
// in a different order), SHAPE / DTYPE (shapes or dtypes that differ between ranks, unsupported dtypes),
// DEVICE (a tensor on the wrong device; NCCL or a GPU missing), COMM (a peer died or aborted), TIMEOUT.
#pragma once
#include <atomic>
#include <memory>
#include <mutex>
#include <string>

#include "../native/src/core/tensor.h"

namespace nx {
namespace cluster {

struct CommOptions {
  // How long a collective (and joining) waits for a live peer before TIMEOUT.
  int64_t timeout_ms = 60000;
  // shm: bytes each rank stages per round (two such buffers per rank); larger tensors go in rounds.
  size_t slot_bytes = size_t(1) << 20;
};

class Communicator : public std::enable_shared_from_this<Communicator> {
 public:
  virtual ~Communicator() = default;
  int rank() const { return rank_; }
  int world() const { return world_; }
  virtual const char* backend() const = 0;
  // -1 for host tensors (shm), the CUDA ordinal for NCCL.
  virtual int device() const = 0;
  // Collectives issued so far on this rank (every rank of a healthy group has the same count).
  uint64_t calls() const { return seq_; }

  // Queued collectives (see the header comment). all_reduce_sum_ and broadcast_ write in place: `t` must
  // be contiguous and writable. all_gather returns a new contiguous tensor whose `dim` is world times
  // longer (the ranks' tensors in rank order); every rank must pass the same shape.
  virtual void all_reduce_sum_(const Tensor& t) = 0;
  virtual Tensor all_gather(const Tensor& t, int dim) = 0;
  virtual void broadcast_(const Tensor& t, int root) = 0;
  virtual Tensor barrier() = 0;

  // Immediately (not queued): fail this rank's and every peer's pending and later collectives with COMM
  // naming this rank and `why`. Used when a rank fails outside a collective (a JS error).
  virtual void abort(const std::string& why) = 0;
  // Leave the group (queued after this rank's pending collectives); peers still waiting get COMM.
  virtual void close() = 0;

  // The first error that broke this communicator, or null.
  std::shared_ptr<const Error> broken() const;

 protected:
  Communicator(int rank, int world) : rank_(rank), world_(world) {}
  // Record the first failure (later calls fail with it) and return the error to throw.
  const Error& fail(const Error& e);
  void throw_if_broken() const;

  const int rank_, world_;
  uint64_t seq_ = 0;  // collectives issued so far (numbers them in messages)

 private:
  mutable std::mutex mu_;
  std::shared_ptr<const Error> broken_;
};

// The checks every backend shares. `what` names the collective in messages.
void check_collective_input(const Tensor& t, int device, const char* what, bool in_place);
// The shape of all_gather's result and the normalized dim.
Shape gathered_shape(const Tensor& t, int world, int* dim);
const char* collective_name(int kind);

enum CollectiveKind : uint32_t { kAllReduce = 1, kAllGather = 2, kBroadcast = 3, kBarrier = 4 };

// ---- shared memory (processes on one machine) ----
// Rank 0 creates the segment `name` (in /dev/shm, else $TMPDIR or /tmp; NX_SHM_DIR overrides), the others
// open it; blocks until every rank joined (TIMEOUT after opts.timeout_ms naming the missing ranks), then
// rank 0 removes the file (the mappings stay), so nothing is left behind even if a rank crashes later.
// `name`: [A-Za-z0-9._-], unique per group (the launcher makes it).
std::shared_ptr<Communicator> shm_join(const std::string& name, int rank, int world, const CommOptions& opts);

// ---- NCCL (CUDA tensors) ----
// Whether NCCL can be used here (a CUDA build, a usable GPU, libnccl.so.2 loadable); `why` when not.
bool nccl_available(std::string* why);
// ncclGetUniqueId as 256 hex characters (rank 0 makes it; the launcher hands it to the others).
std::string nccl_unique_id();
// ncclCommInitRank on CUDA device `device`; blocks until every rank joined.
std::shared_ptr<Communicator> nccl_join(const std::string& unique_id_hex, int rank, int world, int device, const CommOptions& opts);

}  // namespace cluster
}  // namespace nx
