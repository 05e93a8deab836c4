// reduce_test.cpp: nx::cuda reduce / cumsum / softmax / log_softmax against nx::ref (kernels/cpu/reduce.h) on
// every dim of odd shapes (lines of 1 element, of more than one block's 256 threads, empty), every
// layout and dtype, with NaNs and ties for the arg-reductions.
#include <string>
#include <vector>

#include "../../kernels/cpu/reduce.h"
#include "../../kernels/cuda/cuda.h"
#include "harness.h"

using nx::DType;
using nx::ReduceOp;
using nxc::Layout;

namespace {
const std::vector<std::vector<int64_t>> kShapes = {{1}, {5}, {3, 1000}, {1000, 3}, {2, 3, 4}, {7, 1, 9}, {4, 0}, {2, 300, 2}};
const char* kNames[] = {"sum", "mean", "max", "min", "prod", "argmax", "argmin"};
const DType kTypes[] = {DType::F32, DType::F16, DType::BF16, DType::I32, DType::I64};

std::string label(const char* op, DType d, const std::vector<int64_t>& shape, int dim, Layout l) {
  std::string s = std::string(op) + " " + nx::dtype_name(d) + " [";
  for (size_t i = 0; i < shape.size(); i++) s += (i ? "," : "") + std::to_string(shape[i]);
  return s + "] dim " + std::to_string(dim) + " " + nxc::layout_name(l);
}
}  // namespace

NXC_TEST(cuda_reduce_vs_ref) {
  for (int opi = 0; opi <= static_cast<int>(ReduceOp::ARGMIN); opi++) {
    const ReduceOp op = static_cast<ReduceOp>(opi);
    const bool arg = op == ReduceOp::ARGMAX || op == ReduceOp::ARGMIN;
    for (const auto& shape : kShapes) {
      for (int dim = 0; dim < static_cast<int>(shape.size()); dim++) {
        if (shape[dim] == 0 && op != ReduceOp::SUM && op != ReduceOp::MEAN && op != ReduceOp::PROD) continue;
        for (DType dx : kTypes) {
          const Layout lx = nxc::kLayouts[nxc::rand_int(0, 2)];
          auto x = nxc::make(shape, dx, lx);
          if (op == ReduceOp::PROD) nxc::fill_random(*x, nx::dtype_is_float(dx) ? 0.7 : -2, nx::dtype_is_float(dx) ? 1.3 : 2);
          else if (arg) nxc::fill_random(*x, -3, 3);  // ints: many ties (first index must win)
          else nxc::fill_random(*x, -100, 100);
          // NaN in some lines (float arg / max / min: NaN wins, first NaN's index)
          int64_t numel = 1;
          for (auto s : shape) numel *= s;
          if (nx::dtype_is_float(dx) && numel > 3 && nxc::rand_int(0, 1)) {
            nxc::set_f(*x, numel / 3, NAN);
            nxc::set_f(*x, numel / 2, NAN);
          }
          std::vector<int64_t> oshape(shape);
          oshape[dim] = 1;
          DType od = dx;
          if (arg) od = DType::I64;
          else if (op == ReduceOp::MEAN && !nx::dtype_is_float(dx)) od = DType::F32;
          else if ((op == ReduceOp::SUM || op == ReduceOp::PROD) && !nx::dtype_is_float(dx)) od = DType::I64;
          auto want = nxc::make(oshape, od, nxc::kLayouts[nxc::rand_int(0, 2)]), got = nxc::clone(*want);
          nx::ref::reduce(op, x->h, dim, want->h);
          nx::cuda::reduce(op, x->d, dim, got->d);
          // Tolerance: float sums / products accumulate in double on both sides; only the order of
          // the operations differs, which moves a sum by at most n * 2^-52 * sum|x| (<= 2.3e-8 here:
          // n <= 1000, |x| <= 100) and is otherwise invisible after rounding to f32 except at ties:
          // 1 f32 ulp plus 1 ulp of a narrow output, and atol 1e-7 for sums that cancel to near 0.
          // max / min / arg* / integer math: exact.
          const bool fl_acc = nx::dtype_is_float(od) && (op == ReduceOp::SUM || op == ReduceOp::MEAN || op == ReduceOp::PROD);
          const double rtol = fl_acc ? nxc::ulp1(DType::F32) + nxc::ulp1(od) : 0.0;
          nxc::allclose(*got, *want, fl_acc ? 1e-7 : 0.0, rtol, label(kNames[opi], dx, shape, dim, lx));
        }
      }
    }
  }
}

NXC_TEST(cuda_cumsum_softmax_vs_ref) {
  for (const auto& shape : kShapes) {
    for (int dim = 0; dim < static_cast<int>(shape.size()); dim++) {
      for (DType dx : kTypes) {
        const Layout lx = nxc::kLayouts[nxc::rand_int(0, 2)];
        auto x = nxc::make(shape, dx, lx);
        nxc::fill_random(*x, -8, 8);
        // cumsum: the same running double / uint64 sum as the reference: exact
        const DType od = nx::dtype_is_float(dx) ? dx : DType::I64;
        auto want = nxc::make(shape, od, nxc::kLayouts[nxc::rand_int(0, 2)]), got = nxc::clone(*want);
        nx::ref::cumsum(x->h, dim, want->h);
        nx::cuda::cumsum(x->d, dim, got->d);
        nxc::allclose(*got, *want, 0, 0, label("cumsum", dx, shape, dim, lx));
        if (!nx::dtype_is_float(dx)) continue;
        for (bool lg : {false, true}) {
          auto sw = nxc::make(shape, dx, nxc::kLayouts[nxc::rand_int(0, 2)]), sg = nxc::clone(*sw);
          nx::ref::softmax(x->h, dim, lg, sw->h);
          nx::cuda::softmax(x->d, dim, lg, sg->d);
          // Tolerance: x - max in f32 (exact when within a factor 2 of max, else 0.5 ulp of the
          // difference, |d| <= 16 here: 1e-6 absolute) and expf (2 ulp) where the reference uses
          // double; the sum is in double on both sides. softmax: rtol 4 ulp + 1e-6 * |d| folded
          // into 2e-6, atol 1e-9 for tiny probabilities; log_softmax: atol 2e-6 (the f32 rounding
          // of d), rtol 1e-6. Narrow outputs: plus one ulp of the output.
          const double atol = lg ? 2e-6 : 1e-9, rtol = (lg ? 1e-6 : 2e-6) + nxc::ulp1(dx);
          nxc::allclose(*sg, *sw, atol, rtol, label(lg ? "log_softmax" : "softmax", dx, shape, dim, lx));
        }
      }
    }
  }
  // softmax of a line with NaN / -inf: NaN where the reference gives NaN (exact classes)
  auto x = nxc::make({2, 5}, DType::F32);
  nxc::fill_random(*x);
  nxc::set_f(*x, 1, NAN);
  for (int i = 5; i < 10; i++) nxc::set_f(*x, i, -INFINITY);
  for (bool lg : {false, true}) {
    auto w = nxc::make({2, 5}, DType::F32), g = nxc::clone(*w);
    nx::ref::softmax(x->h, 1, lg, w->h);
    nx::cuda::softmax(x->d, 1, lg, g->d);
    nxc::allclose(*g, *w, 0, 0, lg ? "log_softmax nan/-inf" : "softmax nan/-inf");
  }
}

NXC_TEST(cuda_reduce_empty_dim_error) {
  auto x = nxc::make({3, 0}, DType::F32), o = nxc::make({3, 1}, DType::F32);
  const std::string want = nxc::expect_error([&] { nx::ref::reduce(ReduceOp::MAX, x->h, 1, o->h); }, "BAD_INPUT", "ref max of empty");
  const std::string got = nxc::expect_error([&] { nx::cuda::reduce(ReduceOp::MAX, x->d, 1, o->d); }, "BAD_INPUT", "cuda max of empty");
  NXC_EXPECT(got == want, "message '%s' vs '%s'", got.c_str(), want.c_str());
}
