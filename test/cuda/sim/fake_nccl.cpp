// fake_nccl.cpp: a ONE-RANK stand-in libnccl.so.2 for the CPU simulation (test/cuda/sim/run.sh with
// NX_SIM_ADDON=1): the entry points cluster/nccl_comm.cpp resolves, where a group of one rank makes every
// collective a copy from the send to the receive buffer (device memory is host memory in the simulation,
// and launches run at once, so a plain copy is in stream order). It exercises the NCCL communicator's own
// logic (dlopen, dtype mapping, the all_gather permute copy, barrier, close) and nothing of NCCL: real
// groups, real GPUs and multi-rank behaviour are only tested where test/cluster/nccl.test.ts finds them.
#include <cstddef>
#include <cstring>

extern "C" {
struct ncclUniqueId {
  char internal[128];
};
static size_t elem(int dt) {
  switch (dt) {
    case 0: case 1: return 1;                    // int8, uint8
    case 2: case 3: case 7: return 4;            // int32, uint32, float32
    case 4: case 5: case 8: return 8;            // int64, uint64, float64
    case 6: case 9: return 2;                    // float16, bfloat16
  }
  return 0;
}
int ncclGetUniqueId(ncclUniqueId* id) {
  std::memset(id->internal, 0x5a, sizeof id->internal);
  return 0;
}
int ncclCommInitRank(void** comm, int nranks, ncclUniqueId, int rank) {
  if (nranks != 1 || rank != 0) return 4;  // ncclInvalidArgument: this stand-in has one rank
  static int one;
  *comm = &one;
  return 0;
}
int ncclCommDestroy(void*) { return 0; }
int ncclCommAbort(void*) { return 0; }
int ncclAllReduce(const void* s, void* r, size_t n, int dt, int op, void*, void*) {
  if (elem(dt) == 0 || op != 0) return 4;
  if (s != r) std::memmove(r, s, n * elem(dt));
  return 0;
}
int ncclAllGather(const void* s, void* r, size_t n, int dt, void*, void*) {
  if (elem(dt) == 0) return 4;
  if (s != r) std::memmove(r, s, n * elem(dt));
  return 0;
}
int ncclBroadcast(const void* s, void* r, size_t n, int dt, int root, void*, void*) {
  if (elem(dt) == 0 || root != 0) return 4;
  if (s != r) std::memmove(r, s, n * elem(dt));
  return 0;
}
const char* ncclGetErrorString(int r) { return r == 4 ? "invalid argument (one-rank stand-in)" : "stand-in error"; }
}
