// ops_cuda.h: dispatch by device. run_op (ops.cpp) asks op_device() which device an op's inputs live
// on; ops whose inputs are on a CUDA device go to run_op_cuda. Also the host <-> device copies.
//
//   nx::Tensor g = nx::to_device(t, 0);            // a contiguous copy on cuda:0 (queued on the executor)
//   auto out = nx::run_op(nx::Op::ADD, {&g, &g}, {}); // runs on cuda:0
//   nx::Tensor h = nx::to_device(out[0], -1);      // back to the host
//
// Rules: every tensor input of an op must be on one device, else Error{"DEVICE"} naming the op and the
// devices (scalars made by the JS layer are created on their operand's device). run_op_cuda first runs
// the CPU dispatcher's own checks on shape-only stand-ins of the inputs (so both devices accept and
// reject exactly the same calls with the same messages, and produce the same output shapes, dtypes and
// layouts), then allocates the outputs on the device and queues the CUDA kernel on the executor: the
// executor thread launches it on the device's stream, in order with everything else. Without CUDA in the
// build (or on the machine) every entry point throws Error{"DEVICE"} with the reason.
#pragma once
#include <string>
#include <vector>

#include "op-table.h"
#include "tensor.h"

namespace nx {

int op_device_mixed(Op op, const std::vector<const Tensor*>& in);
// -1 when every tensor input is on the host, else the one CUDA device they share (DEVICE error on a mix).
inline int op_device(Op op, const std::vector<const Tensor*>& in) {
  for (const Tensor* t : in)
    if (t != nullptr && t->storage->device >= 0) return op_device_mixed(op, in);
  return -1;
}

std::vector<Tensor> run_op_cuda(Op op, const std::vector<const Tensor*>& in, const std::vector<double>& attrs, int device);

// A contiguous copy of t on `device` (-1 = host, >= 0 = CUDA ordinal); t itself when it is already there.
Tensor to_device(const Tensor& t, int device);

// Copy the bytes of a contiguous tensor (host or device) to host memory dst. Call after the executor
// synced (the values must exist); waits for the device's stream.
void read_bytes(const Tensor& dense, void* dst, size_t nbytes);

// "cpu" or "cuda:N".
std::string device_str(int device);

// Whether this build has CUDA, whether a device is usable (why not, when not), and how many there are.
bool cuda_compiled();
bool cuda_available(std::string* why);
int cuda_device_count();
// Wait for every CUDA stream that ran work (a no-op when nothing ran on a GPU). After executor().sync().
void device_sync();
// Bytes the CUDA caching allocator holds: in use by tensors and cached for reuse; and dropping the cache.
size_t cuda_bytes_in_use();
size_t cuda_bytes_cached();
void release_cached_device_memory();

}  // namespace nx
