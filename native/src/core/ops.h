// ops.h: validate an op call, allocate its outputs and queue its kernel on the executor.
//
//   std::vector<nx::Tensor> out = nx::run_op(nx::Op::ADD, {&a, &b}, {});
//
// Inputs may be nullptr where the op table marks them optional. Every argument is checked here
// (shapes, dtypes, dims, in-place targets), throwing nx::Error with a stable code, before anything is
// queued; kernels only see valid calls. In-place ops (name ends in "_") return their first input.
#pragma once
#include <cstdint>
#include <random>
#include <vector>

#include "op-table.h"
#include "tensor.h"

namespace nx {

std::vector<Tensor> run_op(Op op, const std::vector<const Tensor*>& inputs, const std::vector<double>& attrs);

// Kernel selection: "fast" (default) or "ref" (the reference kernels; NX_KERNELS=ref or set here).
void set_use_reference_kernels(bool ref);
bool use_reference_kernels();

// Output dtype of a binary op between a and b (PyTorch-like promotion).
DType promote_types(DType a, DType b);

// The values randn_ draws, on every device: mt19937_64 + Box-Muller written out (std::normal_distribution
// is implementation-defined), so a seed gives the same numbers everywhere.
class NormalStream {
 public:
  explicit NormalStream(uint64_t seed) : g_(seed) {}
  double next();

 private:
  std::mt19937_64 g_;
  double spare_ = 0;
  bool has_spare_ = false;
};

}  // namespace nx
